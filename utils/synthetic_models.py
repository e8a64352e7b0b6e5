"""Text encoders and Whisper speech recognisers with seeded random weights, saved to a folder that
`from_pretrained(folder)` loads (nothing downloaded), for tests and benchmarks of the steps that run them:
utils/build_corpus.py and utils/text_encoder.py (the text encoder), utils/transcribe.py (Whisper, through the
transformers speech recognition pipeline), and method/index_videos.py (both).

    from utils.synthetic_models import save_random_text_model, save_random_whisper
    save_random_text_model(folder)                       # a 16-d, 2-layer RoBERTa over the words of WORDS
    save_random_text_model(folder, hidden_size=8)        # the same words, 8-d
    save_random_whisper(folder)                          # a 16-d, 1 + 1-layer Whisper over the first 10 of WORDS
    save_random_whisper(folder, words=numbered_words(WORDS[:16], 51865 - WHISPER_NON_WORD_TOKENS), d_model=768,
                        layers=12, heads=12, ffn_dim=3072, max_target_positions=448, max_new_tokens=120)
                                                         # whisper-small's architecture and vocabulary size

Same arguments, same saved weights: each model is initialised right after torch.manual_seed(seed).

The text model is a RobertaModel with a word-level tokenizer (whitespace and punctuation split, unknown words
-> <unk>, each text wrapped in <s> ... </s>). The Whisper model is a multilingual WhisperForConditionalGeneration
(80 mel bins) whose one language is English (it detects the language, and is told to transcribe or translate),
with its feature extractor and a byte-level BPE tokenizer without merges: the letters, and each word as one token
with its leading space; then Whisper's special tokens and its 1,501 timestamp tokens, in Whisper's order. Its
random weights decode random words between timestamps.
"""
import json
import os

WORDS = ("a man woman opens closes door the car walks runs into room dog cat red blue and with "
         "hello there how are you fine thanks what is that nothing").split()
TEXT_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]

WHISPER_LETTERS = ["!"] + list("abcdefghijklmnopqrstuvwxyz")
WHISPER_SPECIAL_TOKENS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>",
                          "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
WHISPER_TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|>, every 0.02 s, as Whisper's vocabulary
WHISPER_NON_WORD_TOKENS = len(WHISPER_LETTERS) + len(WHISPER_SPECIAL_TOKENS) + WHISPER_TIMESTAMPS
WHISPER_MEL_BINS = 80


def numbered_words(words, n):
    """n distinct words: `words`, then w0, w1, ... (a vocabulary of a given size that still holds real words)."""
    return list(words) + [f"w{i}" for i in range(n - len(words))]


def save_random_text_model(folder, hidden_size=16, seed=0, words=WORDS, intermediate_size=32, max_positions=40):
    """Write a word-level tokenizer of TEXT_SPECIAL_TOKENS + `words` (duplicates dropped) and a 2-layer, 2-head
    RobertaModel with random weights to `folder` -> folder (a str). max_positions: the position embeddings, which
    bound the tokens of a text (<s> and </s> included) to max_positions - 2 (RoBERTa's positions start after the
    padding index)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaModel

    folder = os.fspath(folder)
    vocab = {token: i for i, token in enumerate(TEXT_SPECIAL_TOKENS + list(dict.fromkeys(words)))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)
    config = RobertaConfig(vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=intermediate_size, max_position_embeddings=max_positions,
                           pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"])
    torch.manual_seed(seed)
    RobertaModel(config).eval().save_pretrained(folder)
    return folder


def save_random_whisper(folder, seed=0, words=WORDS[:10], d_model=16, layers=1, heads=2, ffn_dim=32,
                        max_target_positions=64, max_new_tokens=None):
    """Write a WhisperProcessor (feature extractor and tokenizer) and a WhisperForConditionalGeneration with random
    weights, `layers` encoder and `layers` decoder layers, to `folder` -> folder (a str). The vocabulary holds
    WHISPER_NON_WORD_TOKENS + len(words) tokens. Generation stops after max_new_tokens tokens, or, without it, at
    max_target_positions tokens in all (the decoder's limit)."""
    import torch
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizer)

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vocab_path, "w") as f:
        json.dump({token: i for i, token in enumerate(WHISPER_LETTERS + ["Ġ" + word for word in words])}, f)
    with open(merges_path, "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = WhisperTokenizer(vocab_path, merges_path, unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                                 eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": WHISPER_SPECIAL_TOKENS})
    tokenizer.add_tokens([f"<|{i * 0.02:.2f}|>" for i in range(WHISPER_TIMESTAMPS)])
    WhisperProcessor(WhisperFeatureExtractor(feature_size=WHISPER_MEL_BINS), tokenizer).save_pretrained(folder)

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in WHISPER_SPECIAL_TOKENS}
    special_ids = dict(decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=ids["<|endoftext|>"],
                       pad_token_id=ids["<|endoftext|>"])
    config = WhisperConfig(vocab_size=len(tokenizer), num_mel_bins=WHISPER_MEL_BINS, d_model=d_model,
                           encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=heads,
                           decoder_attention_heads=heads, encoder_ffn_dim=ffn_dim, decoder_ffn_dim=ffn_dim,
                           max_source_positions=1500, max_target_positions=max_target_positions,
                           bos_token_id=ids["<|endoftext|>"], begin_suppress_tokens=None, suppress_tokens=None,
                           **special_ids)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    token_limit = dict(max_length=max_target_positions) if max_new_tokens is None else dict(
        max_new_tokens=max_new_tokens)
    model.generation_config = GenerationConfig(
        **special_ids, no_timestamps_token_id=ids["<|notimestamps|>"], lang_to_id={"<|en|>": ids["<|en|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}, is_multilingual=True,
        max_initial_timestamp_index=50, prev_sot_token_id=ids["<|startofprev|>"], forced_decoder_ids=None,
        **token_limit)
    model.eval().save_pretrained(folder)
    return folder
