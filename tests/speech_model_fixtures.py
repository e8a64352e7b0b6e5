"""A tiny randomly initialised Whisper (model, tokenizer, feature extractor) saved to a folder (nothing
downloaded): the transformers speech recognition pipeline loads it from the folder and returns timestamped
segments of random words."""
import json
import os

WORDS = "a man woman opens closes door the car walks runs".split()
SPECIAL_TOKENS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>",
                  "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
N_TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|> every 0.02 s, as Whisper's vocabulary


def save_tiny_whisper(folder, seed=0):
    """Write a WhisperProcessor + WhisperForConditionalGeneration pair loadable with from_pretrained(folder)
    -> folder. English is its one language; generation stops after 64 tokens per 30 s window."""
    import torch
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizer)

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    # A byte-level BPE vocabulary without merges: letters, and the words as whole tokens ("Ġ": a leading space).
    vocab = {token: i for i, token in enumerate(["!"] + list("abcdefghijklmnopqrstuvwxyz")
                                                 + ["Ġ" + word for word in WORDS])}
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = WhisperTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                                 unk_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                 pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tokenizer.add_tokens([f"<|{i * 0.02:.2f}|>" for i in range(N_TIMESTAMPS)])
    WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tokenizer).save_pretrained(folder)

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    special_ids = dict(decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=ids["<|endoftext|>"],
                       pad_token_id=ids["<|endoftext|>"])
    config = WhisperConfig(vocab_size=len(tokenizer), num_mel_bins=80, encoder_layers=1, decoder_layers=1,
                           d_model=16, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                           decoder_ffn_dim=32, max_source_positions=1500, max_target_positions=64,
                           bos_token_id=ids["<|endoftext|>"], begin_suppress_tokens=None, suppress_tokens=None,
                           **special_ids)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        **special_ids, no_timestamps_token_id=ids["<|notimestamps|>"], lang_to_id={"<|en|>": ids["<|en|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}, is_multilingual=True,
        max_initial_timestamp_index=50, max_length=64, prev_sot_token_id=ids["<|startofprev|>"],
        forced_decoder_ids=None)
    model.eval().save_pretrained(folder)
    return folder
