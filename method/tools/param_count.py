"""Print CONQUER's parameter counts per top-level module and in total.

    python -m method.param_count [--model_config config/model_config.json] [--ctx_mode visual_sub]
        [--similarity_measure general] [--no_output_moe_weight] [--visual_dim 4352] [--text_dim 768]
        [--query_dim 768] [--hidden_dim H] [--max_ctx_len 100]

The model is built on the meta device: no memory is allocated and nothing is initialised.
"""
import argparse
import os
import sys

import torch

import config as config_package
from method.conquer import CONQUER, CTX_MODES, SIMILARITY_MEASURES
from utils.errors import run_cli
from utils.io_utils import DataFileError, load_json

DEFAULT_MODEL_CONFIG = os.path.join(os.path.dirname(config_package.__file__), "model_config.json")


def parameter_counts(model):
    """-> {top-level module name: parameter count} in registration order"""
    return {name: sum(p.numel() for p in module.parameters()) for name, module in model.named_children()}


def build_meta_model(model_cfg, **kwargs):
    with torch.device("meta"):
        return CONQUER(model_cfg, **kwargs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_config", default=DEFAULT_MODEL_CONFIG)
    parser.add_argument("--ctx_mode", default="visual_sub", choices=CTX_MODES)
    parser.add_argument("--similarity_measure", default="general", choices=SIMILARITY_MEASURES)
    parser.add_argument("--no_output_moe_weight", action="store_true")
    parser.add_argument("--visual_dim", type=int, default=4352)
    parser.add_argument("--text_dim", type=int, default=768)
    parser.add_argument("--query_dim", type=int, default=768)
    parser.add_argument("--hidden_dim", type=int, default=None,
                        help="default: bert_config.hidden_size of the model config")
    parser.add_argument("--max_ctx_len", type=int, default=100)
    args = parser.parse_args(argv)
    try:
        model_cfg = load_json(args.model_config)
    except DataFileError as e:
        parser.error(str(e))
    hidden_dim = args.hidden_dim if args.hidden_dim is not None else model_cfg["bert_config"]["hidden_size"]
    model = build_meta_model(
        model_cfg, visual_dim=args.visual_dim, text_dim=args.text_dim, query_dim=args.query_dim,
        hidden_dim=hidden_dim, video_len=args.max_ctx_len, ctx_mode=args.ctx_mode,
        similarity_measure=args.similarity_measure, no_output_moe_weight=args.no_output_moe_weight)
    counts = parameter_counts(model)
    width = max(len(name) for name in counts) + 2
    for name, count in counts.items():
        print(f"{name:<{width}}{count:>14,}")
    print(f"{'total':<{width}}{sum(counts.values()):>14,}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
