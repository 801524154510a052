"""A byte-level tokenizer for random-weight models: every byte is one token, no download.

Random weights make gibberish anyway; what a benchmark needs from the tokenizer is exact, stable
prompt lengths and ids that fit the vocabulary (260 ids fit even the tiny test presets).
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

DECODER_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
ENCODER_SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]


def byte_tokenizer(model_type: str, vocab_size: int) -> PreTrainedTokenizerFast:
    encoder = model_type in ("bert", "roberta", "distilbert", "xlm-roberta", "modernbert")
    specials = ENCODER_SPECIALS if encoder else DECODER_SPECIALS
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    if len(vocab) > vocab_size:
        raise ValueError(f"byte tokenizer needs {len(vocab)} ids, model has vocab_size={vocab_size}")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=specials[3]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if encoder:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", cls_token="[CLS]",
                                       sep_token="[SEP]", unk_token="[UNK]", mask_token="[MASK]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
