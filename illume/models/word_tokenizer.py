"""The demo model's tokenizer: word level over the shapes world's vocabulary, built in code (no download).

Real models bring their own tokenizer (GPT-J's BPE for MAGMA); this one only has to cover the demo world, where
whole words make sequences short and pre-training fast.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
IMAGE_TOKEN = "<|image|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, IMAGE_TOKEN)


def build_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer whose ids are the special tokens, then `words` in the given order."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizers.Lowercase()
    # Same split as illume.data.shapes.split_words: words and single punctuation marks.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="isolated")]
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins with spaces, tidies " ," and " ?"
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
