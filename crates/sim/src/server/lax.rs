//! Booleans read the way vLLM's request models read them: pydantic v2 in lax mode, so clients
//! that send `"stream": 1` or `"stream": "true"` work against the simulator as against vLLM.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A bool in pydantic's lax mode: `true`/`false`, the numbers 0 and 1 (0.0 and 1.0 too), or a
/// string that, lowercased, is one of `0 off f false n no` or `1 on t true y yes`. Use
/// `Option<LaxBool>` where vLLM's field is `bool | None` (null allowed) and `LaxBool` where it
/// is a plain `bool` (null rejected).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct LaxBool(pub(super) bool);

impl<'de> Deserialize<'de> for LaxBool {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<LaxBool, D::Error> {
        d.deserialize_any(LaxBoolVisitor).map(LaxBool)
    }
}

struct LaxBoolVisitor;

impl Visitor<'_> for LaxBoolVisitor {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a valid boolean (true, false, 0, 1 or a string such as \"true\" or \"no\")")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        Ok(v)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<bool, E> {
        match v {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(E::invalid_value(de::Unexpected::Unsigned(v), &self)),
        }
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<bool, E> {
        match u64::try_from(v) {
            Ok(u) => self.visit_u64(u),
            Err(_) => Err(E::invalid_value(de::Unexpected::Signed(v), &self)),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<bool, E> {
        if v == 0.0 {
            Ok(false)
        } else if v == 1.0 {
            Ok(true)
        } else {
            Err(E::invalid_value(de::Unexpected::Float(v), &self))
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        match v.to_ascii_lowercase().as_str() {
            "0" | "off" | "f" | "false" | "n" | "no" => Ok(false),
            "1" | "on" | "t" | "true" | "y" | "yes" => Ok(true),
            _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Req {
        #[serde(default)]
        plain: LaxBool,
        #[serde(default)]
        optional: Option<LaxBool>,
    }

    fn parse(json: &str) -> Result<Req, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn reads_booleans_as_pydantic_lax_mode_does() {
        for (v, want) in [
            ("true", true),
            ("false", false),
            ("1", true),
            ("0", false),
            ("1.0", true),
            ("0.0", false),
            ("\"true\"", true),
            ("\"False\"", false),
            ("\"YES\"", true),
            ("\"off\"", false),
            ("\"1\"", true),
            ("\"n\"", false),
        ] {
            let r = parse(&format!(r#"{{"plain": {v}, "optional": {v}}}"#)).expect(v);
            assert_eq!((r.plain.0, r.optional.map(|b| b.0)), (want, Some(want)), "{v}");
        }
        for bad in ["2", "-1", "0.5", "\"maybe\"", "\"\"", "[]", "{}"] {
            assert!(parse(&format!(r#"{{"plain": {bad}}}"#)).is_err(), "{bad}");
            assert!(parse(&format!(r#"{{"optional": {bad}}}"#)).is_err(), "{bad}");
        }
    }

    #[test]
    fn null_is_none_where_vllm_allows_it_and_an_error_where_not() {
        let r = parse(r#"{"optional": null}"#).expect("optional null");
        assert_eq!((r.plain, r.optional), (LaxBool(false), None));
        assert!(parse(r#"{"plain": null}"#).is_err());
    }
}
