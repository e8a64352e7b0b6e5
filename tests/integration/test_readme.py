"""The README's code map places every module of the tree, and every file it names exists."""
import glob
import os
import re

from utils.run_dir import REPO_ROOT


def code_map():
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        readme = f.read()
    return readme[readme.index("## Code map"):readme.index("\n## ", readme.index("## Code map") + 1)]


def test_code_map_places_every_module():
    section = code_map()
    modules = [os.path.relpath(path, REPO_ROOT) for folder in ("config", "method", "utils")
               for path in glob.glob(os.path.join(REPO_ROOT, folder, "**", "*.py"), recursive=True)
               if os.path.basename(path) != "__init__.py"]
    modules += ["train.py", "inference.py"]
    missing = [m for m in modules if m not in section and os.path.basename(m) not in section]
    assert not missing, f"modules missing from the README code map: {missing}"


def test_code_map_names_only_existing_files():
    named = re.findall(r"`((?:config|method|utils|tests)/[\w/<>]*\.py|\w+\.py)`", code_map())
    paths = [name for name in named if "/" in name and "<" not in name]
    assert paths and all(os.path.exists(os.path.join(REPO_ROOT, p)) for p in paths), paths
