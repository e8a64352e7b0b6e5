"""The search page shows the moments: each on its video's timeline, with a thumbnail of its middle taken from the
sprite the index build made (utils/thumbnails.py), and plays it in place; checked in headless Chromium against the
search results, the video table and the sprite's pixels. Index builds make, link and skip thumbnails.

The corpus's videos are VP8 webm files (Chromium plays them) whose frame colour encodes the frame's index."""
import json
import logging
import math
import os
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

from method.search import Searcher
from method.search_index import SearchIndex, build_index
from utils.io_utils import load_json, load_jsonl, save_json
from utils.thumbnails import SpriteLayout, tile_at, tile_position

pytestmark = pytest.mark.usefixtures("one_thread")

FPS = 2
MARKER_RGB, TIMELINE_RGB = (220, 30, 30), (200, 200, 200)  # the page's CSS colours


def colour_of(frame):
    """A colour per frame index (up to 160 frames, 80 s): neighbouring frames differ by 8 levels of red, and
    thumbnail tiles, 3 frames apart at 1.5 s per tile, by 24."""
    return np.array([(8 * frame) % 256, (frame // 32) * 60, 128], dtype=np.uint8)


def write_webm(path, seconds):
    import av
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for i in range(seconds * FPS):
            frame = av.VideoFrame.from_ndarray(np.broadcast_to(colour_of(i), (24, 32, 3)).copy(), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def corpus_with_videos(tiny_corpus, target, video_dir="videos", skip=(), broken=()):
    """A copy of the corpus of data config `tiny_corpus` at `target`, without the videos folder it may have, and
    with a webm file per val video (as long as the video table says, plus a second) except the videos in `skip`
    (no file) and `broken` (a file that is not a video) -> (data config path, {val video: duration})."""
    shutil.copytree(os.path.dirname(tiny_corpus), target, ignore=shutil.ignore_patterns("videos"))
    config_path = os.path.join(target, "tvr_data_config.json")
    config = dict(load_json(config_path), root_path=str(target))
    if video_dir:
        config["video_dir"] = video_dir
    save_json(config, config_path)
    durations = {name: row[0] for name, row in load_json(os.path.join(target, config["video_duration_idx_path"]))[
        "val"].items()}
    if video_dir:
        os.makedirs(os.path.join(target, video_dir))
        for name, duration in durations.items():
            path = os.path.join(target, video_dir, f"{name}.webm")
            if name in broken:
                with open(path, "wb") as f:
                    f.write(b"not a video" * 100)
            elif name not in skip:
                write_webm(path, math.ceil(duration) + 1)
    return config_path, durations


def serve(searcher):
    from method.search_server import make_server
    httpd = make_server(searcher, host="127.0.0.1", port=0, threads=4, max_queue=2)
    threading.Thread(target=httpd.run, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.effective_port}"


@pytest.fixture(scope="module")
def page(trained_runs, tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    config_path, durations = corpus_with_videos(tiny_corpus, root / "corpus")
    searcher = Searcher(build_index(root / "index", trained_runs["general"], "ranklist", config_path, "val")["out_dir"])
    httpd, url = serve(searcher)
    yield dict(searcher=searcher, durations=durations, url=url)
    httpd.close()


@pytest.fixture(scope="module")
def driver():
    from tests.integration.test_search import headless_chromium
    browser = headless_chromium()
    browser.set_window_size(1400, 900)
    yield browser
    browser.quit()


def search_on_page(driver, url, desc_id, top_k):
    """Type a desc_id query and top_k into the page, search, and wait for the rows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    driver.get(url + "/")
    wait = WebDriverWait(driver, 30)
    wait.until(lambda d: "videos" in d.find_element(By.ID, "about").text)
    assert driver.find_element(By.ID, "kind").get_attribute("value") == "desc_id"
    driver.find_element(By.ID, "query").send_keys(str(desc_id))
    field = driver.find_element(By.ID, "top_k")
    field.clear()
    field.send_keys(str(top_k))
    driver.find_element(By.ID, "go").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.moment")) == top_k)
    return wait


READ_ROWS = """
return Array.from(document.querySelectorAll("tr.moment")).map(row => {
  const rect = (e) => { if (!e) { return null; } const r = e.getBoundingClientRect();
                        return {x: r.left, y: r.top, width: r.width, height: r.height}; };
  const thumb = row.querySelector(".thumb");
  return {cells: Array.from(row.cells).slice(1, 4).map(c => c.textContent),
          playable: row.classList.contains("playable"),
          timeline: rect(row.querySelector(".timeline")), marker: rect(row.querySelector(".marker")),
          thumb: thumb && {rect: rect(thumb), position: getComputedStyle(thumb).backgroundPosition,
                           image: getComputedStyle(thumb).backgroundImage,
                           loaded: thumb.classList.contains("loaded")}};
});
"""


def assert_marker_is_the_moment(row, moment, duration):
    """The marker's offset and width on its timeline, as fractions of the bar, are start / duration and
    (end - start) / duration (the moment clipped to the video; the marker is at least 3 px wide)."""
    bar, marker = row["timeline"], row["marker"]
    start, end = min(moment.start, duration), min(moment.end, duration)
    assert abs((marker["x"] - bar["x"]) / bar["width"] - start / duration) < 1.01 / bar["width"]
    assert abs(marker["width"] - max(3.0, (end - start) / duration * bar["width"])) < 1.01
    assert bar["height"] > 0 and marker["height"] == bar["height"]


def inside(moment, durations):
    """Whether the moment starts after its video's start and ends 2 s before its end."""
    return moment.start > 0 and moment.end < durations[moment.video_name] - 2


def test_page_shows_timelines_and_thumbnails_and_plays_in_place(page, driver, tmp_path):
    from selenium.webdriver.common.by import By
    searcher, durations = page["searcher"], page["durations"]
    # A query whose moments come from several videos and include one inside its video (for the screenshot and
    # the pause at its end).
    desc_id, moments = next((row["desc_id"], found) for row in searcher.dataset.query_data
                            for found in [searcher.search(row["desc_id"], top_k=20)]
                            if len({m.video_name for m in found}) > 2 and any(inside(m, durations) for m in found))
    wait = search_on_page(driver, page["url"], desc_id, 20)
    wait.until(lambda d: all(row["thumb"]["loaded"] for row in d.execute_script(READ_ROWS)))
    rows = driver.execute_script(READ_ROWS)
    for row, moment in zip(rows, moments):
        assert row["cells"] == [moment.video_name, f"{moment.start:.2f}", f"{moment.end:.2f}"] and row["playable"]
        assert_marker_is_the_moment(row, moment, durations[moment.video_name])
        sprite, layout = searcher.index.thumbnails[moment.video_name]
        layout = SpriteLayout(**layout)
        middle = (moment.start + min(moment.end, durations[moment.video_name])) / 2
        x, y = tile_position(layout, tile_at(layout, middle))
        assert row["thumb"]["position"] == f"{-x}px {-y}px"
        assert row["thumb"]["image"].endswith(f'/thumbnail/{moment.video_name}")')
        assert (row["thumb"]["rect"]["width"], row["thumb"]["rect"]["height"]) == (layout.tile_width,
                                                                                   layout.tile_height)

    # The screenshot: the marker's colour at the marker, the bar's beside it; the thumbnail's pixels are those of
    # its tile in the sprite, and of no other tile.
    index = next(i for i, m in enumerate(moments) if inside(m, durations))
    moment = moments[index]
    row_element = driver.find_elements(By.CSS_SELECTOR, "tr.moment")[index]
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", row_element)
    row = driver.execute_script(READ_ROWS)[index]
    scale = driver.execute_script("return window.devicePixelRatio")
    driver.save_screenshot(str(tmp_path / "page.png"))
    shot = np.asarray(Image.open(tmp_path / "page.png").convert("RGB"), dtype=np.int64)

    def pixel(x, y):
        return shot[int(round(y * scale)), int(round(x * scale))]

    marker, bar = row["marker"], row["timeline"]
    middle_y = bar["y"] + bar["height"] / 2
    assert np.abs(pixel(marker["x"] + marker["width"] / 2, middle_y) - MARKER_RGB).max() <= 2
    assert np.abs(pixel(bar["x"] + 1, middle_y) - TIMELINE_RGB).max() <= 2  # start > 0: the bar's left is free
    sprite_path, layout = searcher.index.thumbnails[moment.video_name]
    layout = SpriteLayout(**layout)
    sprite = np.asarray(Image.open(sprite_path).convert("RGB"), dtype=np.int64)
    centres = [sprite[y + layout.tile_height // 2, x + layout.tile_width // 2]
               for x, y in (tile_position(layout, tile) for tile in range(layout.n_tiles))]
    shown = pixel(row["thumb"]["rect"]["x"] + layout.tile_width / 2, row["thumb"]["rect"]["y"] + layout.tile_height / 2)
    tile = tile_at(layout, (moment.start + min(moment.end, durations[moment.video_name])) / 2)
    assert np.abs(shown - centres[tile]).max() <= 6
    assert int(np.argmin([np.abs(shown - c).max() for c in centres])) == tile

    # Click: the player moves under the row, starts at the moment's start and pauses at its end.
    row_element.click()
    player = driver.find_element(By.ID, "player")
    wait.until(lambda d: d.execute_script(
        "const p = arguments[0]; return p.readyState >= 1 && p.currentTime >= arguments[1] - 0.01 && "
        "p.closest('tr').previousElementSibling === arguments[2]", player, moment.start, row_element))
    assert moment.video_name in player.get_attribute("src")
    assert abs(driver.execute_script("return arguments[0].currentTime", player) - moment.start) < 1.0
    # The file goes on past the moment's end (inside()): a pause there is the page's.
    driver.execute_script("arguments[0].playbackRate = 4", player)
    wait.until(lambda d: d.execute_script("return arguments[0].paused && arguments[0].currentTime > arguments[1]",
                                          player, moment.start + 0.5))
    assert abs(driver.execute_script("return arguments[0].currentTime", player) - moment.end) < 1.2


def test_search_answer_describes_the_videos_of_its_moments(page):
    """POST /search adds, per video of the results, its duration (the video table's), its sprite's layout and
    whether it plays: no server paths; GET /thumbnail/<name> serves the sprite."""
    from method.search_server import create_app
    searcher = page["searcher"]
    client = create_app(searcher).test_client()
    desc_id = searcher.dataset.query_data[1]["desc_id"]
    answer = client.post("/search", json={"desc_id": desc_id, "top_k": 20}).json
    assert answer["results"] == [m._asdict() for m in searcher.search(desc_id, top_k=20)]
    assert list(answer["videos"]) == list(dict.fromkeys(row["video_name"] for row in answer["results"]))
    for name, video in answer["videos"].items():
        assert video == dict(duration=page["durations"][name], thumbnails=searcher.index.thumbnails[name][1],
                             playable=True)
    assert "/" not in json.dumps(answer["videos"])
    sprite = client.get(f"/thumbnail/{name}")
    with open(searcher.index.thumbnails[name][0], "rb") as f:
        assert sprite.status_code == 200 and sprite.mimetype == "image/jpeg" and sprite.data == f.read()
    assert client.get("/thumbnail/not_a_video").status_code == 404
    assert client.get("/info").json["thumbnails"] == len(searcher.index.video_names)


def test_page_without_a_video_folder_shows_timelines_only(trained_runs, tiny_corpus, driver, tmp_path):
    from selenium.webdriver.common.by import By
    config_path, durations = corpus_with_videos(tiny_corpus, tmp_path / "corpus", video_dir=None)
    searcher = Searcher(build_index(tmp_path / "index", trained_runs["general"], "ranklist", config_path,
                                    "val")["out_dir"])
    assert searcher.index.thumbnails == {}
    desc_id = searcher.dataset.query_data[0]["desc_id"]
    moments = searcher.search(desc_id, top_k=5)
    httpd, url = serve(searcher)
    try:
        search_on_page(driver, url, desc_id, 5)
        for row, moment in zip(driver.execute_script(READ_ROWS), moments):
            assert row["thumb"] is None and not row["playable"]
            assert_marker_is_the_moment(row, moment, durations[moment.video_name])
        driver.find_elements(By.CSS_SELECTOR, "tr.moment")[0].click()
        assert not driver.find_element(By.ID, "player").is_displayed()
        answer = json.loads(driver.execute_script(
            "const r = await fetch('/thumbnail/' + arguments[0]); return JSON.stringify([r.status]);",
            moments[0].video_name))
        assert answer == [404]
    finally:
        httpd.close()


def test_build_and_update_make_link_and_skip_thumbnails(trained_runs, tiny_corpus, tmp_path, caplog):
    """Videos without a file or with an undecodable one get no thumbnails and one warning; an update decodes the
    new videos only and hard-links the others' sprites."""
    names = list(load_json(os.path.join(os.path.dirname(tiny_corpus), "data", "tvr_video2dur_idx.json"))["val"])
    missing, broken = names[2], names[5]
    config_path, _ = corpus_with_videos(tiny_corpus, tmp_path / "corpus", skip=[missing], broken=[broken])
    config = load_json(config_path)
    table_path, val_path = (os.path.join(tmp_path / "corpus", config[key])
                            for key in ("video_duration_idx_path", "eval_data_path"))
    full_table, full_val = load_json(table_path), load_jsonl(val_path)
    kept = names[:12]
    save_json(dict(full_table, val={name: full_table["val"][name] for name in kept}), table_path)
    with open(val_path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in full_val if row["vid_name"] in kept)
    out = tmp_path / "index"
    with caplog.at_level(logging.WARNING, logger="method.search_index"):
        build_index(out, trained_runs["general"], "ranklist", config_path, "val")
    warnings = [r.getMessage() for r in caplog.records if "thumbnails" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(
        "2 of 12 videos have no thumbnails: 1 without a file in ") and f"{broken}.webm" in warnings[0]
    first = SearchIndex.open(out)
    assert sorted(first.thumbnails) == sorted(set(kept) - {missing, broken})
    inodes = {name: os.stat(path).st_ino for name, (path, _) in first.thumbnails.items()}
    mtimes = {name: os.stat(path).st_mtime_ns for name, (path, _) in first.thumbnails.items()}

    shutil.copy(os.path.join(os.path.dirname(tiny_corpus), "data", "tvr_video2dur_idx.json"), table_path)
    shutil.copy(os.path.join(os.path.dirname(tiny_corpus), "data", "tvr_val_release.jsonl"), val_path)
    build_index(out, trained_runs["general"], "ranklist", config_path, "val", update=True)
    updated = SearchIndex.open(out)
    assert updated.version_dir != first.version_dir and not os.path.exists(first.version_dir)
    assert sorted(updated.thumbnails) == sorted(set(names) - {missing, broken})
    for name, (path, layout) in updated.thumbnails.items():
        assert os.path.dirname(path) == os.path.join(updated.version_dir, "thumbnails")
        if name in inodes:
            assert os.stat(path).st_ino == inodes[name] and os.stat(path).st_mtime_ns == mtimes[name]
            assert layout == first.thumbnails[name][1]
        else:
            assert Image.open(path).size == (layout["columns"] * layout["tile_width"],
                                             math.ceil(layout["n_tiles"] / layout["columns"]) * layout["tile_height"])
