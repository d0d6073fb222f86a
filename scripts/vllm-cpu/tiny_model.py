"""Build a tiny random-weight Llama and a byte-level BPE tokenizer trained here, so vLLM can
serve a model on a machine that reaches no model hub. Deterministic: same seed, same files.

usage: python tiny_model.py OUT_DIR
"""
import pathlib
import random
import re
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

out = sys.argv[1]
rng = random.Random(7)
# The words gpu-agent's loadgen builds prompts from (crates/loadgen/src/prompt.rs), so that each is
# one token here as in real models' tokenizers, plus a few more.
prompt_rs = pathlib.Path(__file__).resolve().parents[2] / "crates/loadgen/src/prompt.rs"
block = re.search(r"pub const WORDS[^=]*= \[(.*?)\];", prompt_rs.read_text(), re.S)
words = re.findall(r'"([a-z]+)"', block.group(1)) if block else []
if len(words) < 10:
    sys.exit(f"no WORDS list found in {prompt_rs}")
words += ["gpu", "clock", "energy", "token", "latency", "batch", "prefill", "decode", "cache", "queue"]
corpus = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(2000)]
corpus += ["".join(chr(rng.randrange(32, 127)) for _ in range(200)) for _ in range(200)]

tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(
    corpus,
    trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    ),
)
fast = PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=2048
)
fast.chat_template = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
fast.save_pretrained(out)

torch.manual_seed(7)
config = LlamaConfig(
    vocab_size=len(fast),
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    bos_token_id=fast.bos_token_id,
    eos_token_id=fast.eos_token_id,
    torch_dtype="bfloat16",
)
LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
print(f"tiny model in {out}: vocab {len(fast)}")
