"""method/tools/benchmark_collection.py, the parts its smoke run (not in a plain --quick run: it trains two runs)
does not check: random-weight Whisper models decoded as a real model would be (one pass of the token budget per
window, with the production recognizer's beams), and the arithmetic of its figures."""
import argparse

import pytest

from method.tools import benchmark_collection as section
from utils.errors import ConquerError


@pytest.fixture(scope="module")
def whisper_and_video(tmp_path_factory):
    folder = tmp_path_factory.mktemp("collection")
    model = section.save_whisper(str(folder / "whisper"), "whisper, test size")
    # 45 s: the pipeline's windows start at 0 and 20 s.
    video = section.tone_video(folder / "speech.mp4", 45.0, (64, 48), 4)
    return model, video


def transcription_counts(model, video, out):
    """The DecodingCounter counts of transcribing `video` with the production recognizer, windows ended by
    WindowEnding."""
    from transformers import LogitsProcessorList

    from utils.transcribe import load_recognizer, transcribe_videos

    recognizer = load_recognizer(model, batch_size=8)
    recognizer.generate_kwargs["logits_processor"] = LogitsProcessorList(
        [section.WindowEnding(recognizer.pipeline.tokenizer)])
    counter = section.DecodingCounter(recognizer.pipeline.model)
    summary = transcribe_videos([video], str(out), recognizer)
    counter.remove()
    assert summary.transcribed == [video]
    return counter.counts()


def test_every_window_is_decoded_once_with_the_token_budget(whisper_and_video, tmp_path):
    model, video = whisper_and_video
    counts = transcription_counts(model, video, tmp_path / "subtitles.jsonl")
    # One batch of both windows: a language-detection step, then TOKENS_PER_WINDOW tokens in one pass.
    assert counts == dict(windows=2, encoder_passes_per_window=2.0, beams=5.0,
                          decoder_steps=1 + section.TOKENS_PER_WINDOW)


def test_window_ending_forces_the_last_timestamp_then_the_end(whisper_and_video):
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(whisper_and_video[0])
    ids = tokenizer.convert_tokens_to_ids
    ending = section.WindowEnding(tokenizer)
    prompt = [ids("<|startoftranscript|>"), ids("<|en|>"), ids("<|transcribe|>")]
    scores = torch.randn(10, len(tokenizer))  # 2 windows x 5 beams
    expected = {section.TOKENS_PER_WINDOW - 2: ids("<|30.00|>"), section.TOKENS_PER_WINDOW - 1: ids("<|endoftext|>")}
    for generated in range(section.TOKENS_PER_WINDOW):
        input_ids = torch.tensor(prompt + [ids("Ġman")] * generated).repeat(10, 1)
        processed = ending(input_ids, scores.clone())
        if generated in expected:
            assert (processed.argmax(dim=1) == expected[generated]).all()
            assert torch.isinf(processed).sum() == 10 * (len(tokenizer) - 1)
        else:
            assert torch.equal(processed, scores)


def test_whisper_architectures_have_the_real_sizes(whisper_and_video):
    from transformers import AutoConfig, AutoTokenizer

    model, _ = whisper_and_video
    assert len(AutoTokenizer.from_pretrained(model)) == section.WHISPER_VOCAB_SIZE == 51865
    assert AutoConfig.from_pretrained(model).vocab_size == 51865
    small = section.WHISPER_ARCHITECTURES["whisper-small"]
    assert (small["d_model"], small["layers"]) == (768, 12)


def test_throughput_and_rerun_figures():
    run = section.per_video_hour(compute_s=30.0, video_seconds=40.0, load_s=2.0)
    assert run["per_video_hour_s"] == pytest.approx(2700.0) and run["x_real_time"] == pytest.approx(4 / 3)

    def index_run(seconds):
        return {"seconds": dict(zip(section.STEPS, seconds)), "n_encoded": 0}
    first = index_run([40.0, 60.0, 4.0, 6.0, 110.0])
    unchanged = index_run([8.0, 7.0, 4.0, 1.0, 20.0])
    added = index_run([12.0, 13.0, 4.5, 1.5, 31.0])
    summary = section.rerun_summary(first, unchanged, added, n_videos=8)
    assert summary["rerun_vs_per_video_share"] == pytest.approx(31.0 / (110.0 / 8))
    assert summary["one_video"] == pytest.approx(dict(features=4.0, subtitles=6.0, corpus=0.5, index=0.5,
                                                      total=11.0))


def test_bad_sizes_name_the_flag():
    args = argparse.Namespace(quick=True, collection_seconds=None, collection_videos=0, collection_video_seconds=None)
    with pytest.raises(ConquerError, match=r"--collection_videos 0: expected a positive number"):
        section.section_sizes(args)
    args.collection_videos, args.collection_seconds = 3, 20.0
    sizes = section.section_sizes(args)
    assert (sizes["videos"], sizes["seconds"], sizes["video_seconds"]) == (3, 20.0, section.QUICK["video_seconds"])
