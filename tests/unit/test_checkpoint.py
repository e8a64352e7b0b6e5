"""Checkpoints: round trip, compatibility with the original loader, safe unpickling, strict loading with
readable errors, and the encoder pre-training loader."""
import os

import pytest
import torch
from easydict import EasyDict

from method.checkpoint import (CheckpointError, build_model, load_checkpoint, load_encoder_pretrain,
                               load_model_weights, save_checkpoint)
from model_fixtures import DIMS, load_model_config, make_batch, make_model

OPT = EasyDict(dict(DIMS, hidden_dim=32, max_ctx_len=12, ctx_mode="visual_sub", similarity_measure="general",
                    no_output_moe_weight=False, lw_st_ed=0.01, lw_video_ce=0.05, debug=False))


def predict(model, batch):
    with torch.no_grad():
        return model.eval().get_pred_from_raw_query(batch)


def test_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss, _ = model.train()(make_batch())
    loss.backward()
    optimizer.step()
    path = tmp_path / "model.ckpt"
    save_checkpoint(path, model.state_dict(), load_model_config("tiny"), epoch=3, optimizer=optimizer.state_dict(),
                    rng_state={"python": (3, tuple(range(5)), None), "torch": torch.get_rng_state()})
    checkpoint = load_checkpoint(path)
    assert checkpoint["epoch"] == 3
    assert isinstance(checkpoint["model_cfg"], EasyDict)
    assert isinstance(checkpoint["model_cfg"].bert_config, EasyDict)
    assert checkpoint["model_cfg"] == load_model_config("tiny")
    restored = build_model(checkpoint["model_cfg"], OPT)
    load_model_weights(restored, checkpoint["model"])
    torch.optim.AdamW(restored.parameters(), lr=1e-3).load_state_dict(checkpoint["optimizer"])
    batch = make_batch()
    for a, b in zip(predict(model, batch)[1:], predict(restored, batch)[1:]):
        assert torch.equal(a, b)


def test_original_loader_reads_our_checkpoint(tmp_path):
    path = tmp_path / "model.ckpt"
    save_checkpoint(path, make_model().state_dict(), load_model_config("tiny"), epoch=-1)
    checkpoint = torch.load(path, weights_only=False)  # what the original's inference does (plus CPU)
    assert set(checkpoint) == {"model", "model_cfg", "epoch"}
    assert type(checkpoint["model_cfg"]) is EasyDict
    assert checkpoint["model_cfg"].bert_config.hidden_size == 32
    assert checkpoint["epoch"] == -1


@pytest.mark.parametrize("zip_format", [True, False])
def test_checkpoint_written_by_the_original_loads(tmp_path, zip_format):
    """The original pickles {"model", "model_cfg": EasyDict, "epoch"} with plain torch.save."""
    model = make_model()
    path = tmp_path / "model.ckpt"
    torch.save({"model": model.state_dict(), "model_cfg": EasyDict(load_model_config("tiny")), "epoch": 7}, path,
               _use_new_zipfile_serialization=zip_format)
    checkpoint = load_checkpoint(path)
    assert checkpoint["epoch"] == 7 and checkpoint["model_cfg"].netvlad_config.text_cluster == 4
    load_model_weights(build_model(checkpoint["model_cfg"], OPT), checkpoint["model"])


class _RunsCodeWhenUnpickled:
    def __init__(self, directory):
        self.directory = directory

    def __reduce__(self):
        return os.mkdir, (self.directory,)


@pytest.mark.parametrize("zip_format", [True, False])
def test_disallowed_pickle_global_is_refused_without_running_it(tmp_path, zip_format):
    marker = tmp_path / "created_by_unpickling"
    path = tmp_path / "evil.ckpt"
    torch.save({"model": {}, "model_cfg": {}, "epoch": 0, "payload": _RunsCodeWhenUnpickled(str(marker))}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)
    assert f"{os.mkdir.__module__}.mkdir" in str(error.value)
    assert not marker.exists()


def test_truncated_corrupt_and_missing_files_name_the_file(tmp_path):
    good = tmp_path / "good.ckpt"
    save_checkpoint(good, make_model().state_dict(), load_model_config("tiny"), epoch=0)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[:len(data) // 2])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    for path in (truncated, garbage, tmp_path / "missing.ckpt"):
        with pytest.raises(CheckpointError, match=str(path)):
            load_checkpoint(path)
    wrong_keys = tmp_path / "wrong_keys.ckpt"
    torch.save({"state_dict": {}}, wrong_keys)
    with pytest.raises(CheckpointError, match="missing key"):
        load_checkpoint(wrong_keys)


def test_saving_refuses_values_the_safe_loader_could_not_read(tmp_path):
    import numpy as np
    with pytest.raises(CheckpointError, match="numpy"):
        save_checkpoint(tmp_path / "x.ckpt", {}, {}, 0, rng_state={"numpy": np.zeros(3)})
    assert not (tmp_path / "x.ckpt").exists()


@pytest.mark.parametrize("trained, built, expected", [
    ({"similarity_measure": "exclusive"}, {}, ["unexpected", "video_scoring_head.", "exclusive"]),
    ({}, {"similarity_measure": "exclusive"}, ["missing", "video_scoring_head.", "general or disjoint"]),
    ({}, {"no_output_moe_weight": True}, ["unexpected", "query_weight.", "without --no_output_moe_weight"]),
    ({"ctx_mode": "visual"}, {}, ["videoEncoder.linear.", "ctx_mode visual"]),
    ({"dims": dict(DIMS, visual_dim=20)}, {}, ["shape mismatches", "img_linear.LayerNorm.weight", "(20,)", "(12,)",
                                               "--visual_dim"]),
])
def test_strict_loading_of_a_mismatched_variant_lists_the_differences(trained, built, expected):
    source = make_model(**trained)
    target = make_model(**built)
    with pytest.raises(CheckpointError) as error:
        load_model_weights(target, source.state_dict(), source="run/model.ckpt")
    message = str(error.value)
    assert message.startswith("run/model.ckpt: weights do not match the model")
    for fragment in expected:
        assert fragment in message


def test_encoder_pretrain_copies_encoder_and_gate(tmp_path):
    torch.manual_seed(0)
    first_stage = make_model()
    path = tmp_path / "first_stage.ckpt"
    save_checkpoint(path, first_stage.state_dict(), load_model_config("tiny"), epoch=0)
    torch.manual_seed(1)
    model = make_model(similarity_measure="exclusive")
    head_before = model.moment_localization_head.state_dict()
    loaded = load_encoder_pretrain(model, path)
    n_encoder = len(first_stage.encoder.state_dict())
    assert loaded == {"encoder": n_encoder, "query_weight": len(first_stage.query_weight.state_dict())}
    for part in ("encoder", "query_weight"):
        for key, value in getattr(first_stage, part).state_dict().items():
            assert torch.equal(getattr(model, part).state_dict()[key], value), key
    for key, value in model.moment_localization_head.state_dict().items():
        assert torch.equal(value, head_before[key])

    no_gate = make_model(no_output_moe_weight=True)
    assert load_encoder_pretrain(no_gate, path) == {"encoder": n_encoder, "query_weight": 0}


def test_encoder_pretrain_errors(tmp_path):
    mismatched = tmp_path / "mismatched.ckpt"
    save_checkpoint(mismatched, make_model(dims=dict(DIMS, query_dim=6)).state_dict(), load_model_config("tiny"), 0)
    with pytest.raises(CheckpointError, match="mismatched.ckpt.*encoder") as error:
        load_encoder_pretrain(make_model(), mismatched)
    assert "queryEncoder.linear.LayerNorm.weight" in str(error.value)
    unrelated = tmp_path / "unrelated.ckpt"
    save_checkpoint(unrelated, {"backbone.weight": torch.zeros(2)}, {}, 0)
    with pytest.raises(CheckpointError, match="unrelated.ckpt: no parameter named 'encoder"):
        load_encoder_pretrain(make_model(), unrelated)
