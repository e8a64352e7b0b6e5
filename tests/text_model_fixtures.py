"""A tiny randomly initialised RoBERTa and a word-level tokenizer, saved to a folder (nothing downloaded)."""
import os

WORDS = ("a man woman opens closes door the car walks runs into room dog cat red blue and with "
         "hello there how are you fine thanks what is that nothing").split()


def save_tiny_text_model(folder, hidden_size=16, seed=0):
    """Write a tokenizer + RobertaModel pair loadable with from_pretrained(folder) -> folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaModel

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + list(dict.fromkeys(WORDS)))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=32, max_position_embeddings=40,
                           pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"])
    RobertaModel(config).eval().save_pretrained(folder)
    return os.fspath(folder)
