//! Synthetic prompt text, and the one token-count rule the simulator applies to text.
//!
//! Real servers tokenize text with the model's tokenizer, whose vocabulary loadgen does not know:
//! token ids that fit one model are out of vocabulary for another (vLLM answers `Token id 20000
//! is out of vocabulary` inside a 200 stream). So prompts are text made of short, common English
//! words, each one token in the byte-level BPE tokenizers vLLM's models ship (a leading space
//! and the word). The real count comes back in the server's `usage.prompt_tokens`, which the
//! report uses; the target length is what the rule below gives.
//!
//! The rule (`count_tokens`), a rough byte-level BPE: a run of ASCII letters with at most one
//! leading space is one token per started 8 letters; every digit is a token (as Llama splits
//! digits); a run of other whitespace is one token; every other character is one token.

use rand::Rng;

/// Words that are a single token (with their leading space) in common BPE vocabularies.
pub const WORDS: [&str; 48] = [
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "with", "as", "on", "be", "at", "by", "this", "from",
    "or", "an", "are", "was", "not", "but", "all", "we", "one", "can", "has", "more", "will", "time", "new", "when",
    "out", "up", "so", "what", "about", "which", "their", "there", "other", "into", "some", "them", "only", "day",
    "first",
];

/// `tokens` random words from [`WORDS`]: joined by single spaces, `tokens` tokens under
/// [`count_tokens`].
pub fn synthetic_words<R: Rng + ?Sized>(tokens: u32, rng: &mut R) -> impl Iterator<Item = &'static str> + '_ {
    (0..tokens).map(move |_| WORDS[rng.random_range(0..WORDS.len())])
}

/// Text of `tokens` tokens under [`count_tokens`]: [`synthetic_words`] joined by spaces.
pub fn synthetic_text<R: Rng + ?Sized>(tokens: u32, rng: &mut R) -> String {
    synthetic_words(tokens, rng).collect::<Vec<_>>().join(" ")
}

/// Letters per token in a long word.
const LETTERS_PER_TOKEN: usize = 8;

/// Tokens `text` stands for under the rule in the module docs (at least 0): the number of
/// [`tokens`].
pub fn count_tokens(text: &str) -> u32 {
    u32::try_from(tokens(text).count()).unwrap_or(u32::MAX)
}

/// The tokens of `text` under the rule in the module docs, as slices of it, in order: they
/// join back to `text`. The simulator's prefix cache hashes them, so prompts that share
/// leading text share leading tokens.
pub fn tokens(text: &str) -> Tokens<'_> {
    Tokens { rest: text }
}

/// Iterator of [`tokens`].
#[derive(Debug, Clone)]
pub struct Tokens<'a> {
    rest: &'a str,
}

impl<'a> Iterator for Tokens<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let s = self.rest;
        let mut chars = s.char_indices();
        let (_, c) = chars.next()?;
        let second = chars.next().map(|(_, c)| c);
        let len = if c == ' ' && second.is_some_and(|c| c.is_ascii_alphabetic()) {
            // The space belongs to the word that follows.
            1 + letters_len(&s[1..])
        } else if c.is_ascii_alphabetic() {
            letters_len(s)
        } else if c.is_whitespace() {
            s.find(|c: char| !c.is_whitespace()).unwrap_or(s.len())
        } else {
            c.len_utf8()
        };
        let (token, rest) = s.split_at(len);
        self.rest = rest;
        Some(token)
    }
}

/// Bytes of the first token of a run of ASCII letters at the start of `s`: up to
/// [`LETTERS_PER_TOKEN`] of them.
fn letters_len(s: &str) -> usize {
    s.bytes().take(LETTERS_PER_TOKEN).take_while(u8::is_ascii_alphabetic).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn synthetic_text_has_the_asked_count() {
        let mut rng = StdRng::seed_from_u64(3);
        for n in [0, 1, 2, 17, 500] {
            let t = synthetic_text(n, &mut rng);
            assert_eq!(count_tokens(&t), n, "{t:?}");
        }
    }

    #[test]
    fn counts_like_a_byte_level_bpe() {
        assert_eq!(count_tokens(""), 0);
        assert_eq!(count_tokens("hello world"), 2);
        assert_eq!(count_tokens(" hello"), 1);
        assert_eq!(count_tokens("internationalization"), 3); // 20 letters
        assert_eq!(count_tokens("2026"), 4);
        assert_eq!(count_tokens("a, b!"), 4);
        assert_eq!(count_tokens("line\n\nnext"), 3);
        assert_eq!(count_tokens("héllo"), 3); // h, é, llo
    }

    #[test]
    fn tokens_join_back_to_the_text_and_split_as_counted() {
        fn split(t: &str) -> Vec<&str> {
            tokens(t).collect()
        }
        assert_eq!(split("hello world"), ["hello", " world"]);
        assert_eq!(split("internationalization"), ["internat", "ionaliza", "tion"]);
        assert_eq!(split(" hi, 42\n\n  there"), [" hi", ",", " ", "4", "2", "\n\n  ", "there"]);
        assert_eq!(split("héllo"), ["h", "é", "llo"]);
        for t in ["", "a", "  two  spaces ", "tabs\tand\r\nbreaks", "ünï cödé!", "x".repeat(33).as_str()] {
            assert_eq!(tokens(t).collect::<String>(), t);
            assert_eq!(count_tokens(t) as usize, tokens(t).count());
        }
    }

    /// The rule as a counting loop, the way it was first written: the splitter must agree.
    fn reference_count(text: &str) -> usize {
        let mut n = 0;
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ' ' && chars.peek().is_some_and(char::is_ascii_alphabetic) {
                continue;
            }
            if c.is_ascii_alphabetic() {
                let mut letters: usize = 1;
                while chars.peek().is_some_and(char::is_ascii_alphabetic) {
                    chars.next();
                    letters += 1;
                }
                n += letters.div_ceil(LETTERS_PER_TOKEN);
            } else if c.is_whitespace() {
                while chars.peek().is_some_and(|c| c.is_whitespace()) {
                    chars.next();
                }
                n += 1;
            } else {
                n += 1;
            }
        }
        n
    }

    #[test]
    fn splitter_agrees_with_the_counting_rule_on_random_text() {
        let alphabet: Vec<char> = "abcXYZ  \n\t7,é".chars().collect();
        let mut rng = StdRng::seed_from_u64(9);
        for _ in 0..2000 {
            let len = rng.random_range(0..40);
            let t: String = (0..len).map(|_| alphabet[rng.random_range(0..alphabet.len())]).collect();
            assert_eq!(tokens(&t).count(), reference_count(&t), "{t:?}");
            assert_eq!(tokens(&t).collect::<String>(), t);
        }
    }

    #[test]
    fn words_are_single_tokens() {
        for w in WORDS {
            assert_eq!(count_tokens(&format!(" {w}")), 1, "{w}");
        }
    }
}
