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


def bash_commands(text):
    """Commands of the first bash block of `text`: continuation lines joined, comments and blank lines dropped."""
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line.strip() for line in block.replace("\\\n", " ").splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_readme_own_videos_commands_are_the_walkthroughs():
    """The README shows the first steps of docs/walkthrough.md, which tests/integration/test_walkthrough.py runs."""
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("## Your own videos"):]
    with open(os.path.join(REPO_ROOT, "docs", "walkthrough.md")) as f:
        walkthrough = [" ".join(command.split()) for command in bash_commands(f.read())]
    shown = [" ".join(command.split()) for command in bash_commands(section)]
    assert len(shown) >= 4 and all(command in walkthrough for command in shown), shown
