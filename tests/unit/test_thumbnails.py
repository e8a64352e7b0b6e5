"""utils/thumbnails.py: sprites of synthetic videos whose frame colour encodes the frame's index, read back pixel
by pixel; the time -> tile mapping and the grid against plain formulations; undecodable files."""
import math

import numpy as np
import pytest
from PIL import Image

from utils.synthetic_video import write_video
from utils.thumbnails import (MAX_JPEG_SIDE, SpriteLayout, ThumbnailError, grid_columns, sprite_size, tile_at,
                              tile_position, tile_step, write_sprite)
from utils.video_decoding import count_clips, video_file

SIZE = (64, 48)  # width, height of the synthetic frames


def colour_of(index):
    """A colour per frame index (up to 16 * 33 frames), 16 and 7 levels apart: JPEG keeps them apart."""
    return np.array([(index % 16) * 16, (index // 16) * 7, 200], dtype=np.float64)


def write_indexed_video(path, frame_times):
    index_of = {round(t * 1000): i for i, t in enumerate(frame_times)}
    write_video(path, frame_times, lambda t: np.broadcast_to(colour_of(index_of[round(t * 1000)]).astype(np.uint8),
                                                             (SIZE[1], SIZE[0], 3)), size=SIZE)


def shown_frames(layout, duration, frame_times):
    """The index of the frame on screen (the last one presented at or before) at the middle of each tile's step."""
    starts = np.arange(layout.n_tiles) * layout.seconds_per_tile
    middles = (starts + np.minimum(starts + layout.seconds_per_tile, duration)) / 2
    return np.searchsorted(frame_times, middles, side="right") - 1


def tile_frames(sprite_path, layout, n_frames):
    """The frame index whose colour is nearest to each tile's median inner colour, and the largest error of an
    inner pixel from that frame's colour."""
    pixels = np.asarray(Image.open(sprite_path).convert("RGB"), dtype=np.float64)
    colours = np.stack([colour_of(i) for i in range(n_frames)])
    found, worst = [], 0.0
    for tile in range(layout.n_tiles):
        x, y = tile_position(layout, tile)
        inner = pixels[y + 4:y + layout.tile_height - 4, x + 4:x + layout.tile_width - 4].reshape(-1, 3)
        nearest = int(np.abs(np.median(inner, axis=0) - colours).max(axis=1).argmin())
        found.append(nearest)
        worst = max(worst, np.abs(inner - colours[nearest]).max())
    return np.array(found), worst


def test_tiles_are_the_frames_at_the_clip_middles(tmp_path):
    frame_times = np.arange(48) / 4  # 12 s at 4 fps
    video = tmp_path / "v.mp4"
    write_indexed_video(video, frame_times)
    sprite = tmp_path / "thumbnails" / "v.jpg"
    layout = write_sprite(video, sprite, clip_length=1.5, tile_width=32)
    assert layout == SpriteLayout(columns=grid_columns(8, 32, 24), tile_width=32, tile_height=24, n_tiles=8,
                                  seconds_per_tile=1.5, first_tile_time=0.75)
    assert Image.open(sprite).format == "JPEG" and Image.open(sprite).size == sprite_size(layout)
    found, worst = tile_frames(sprite, layout, len(frame_times))
    np.testing.assert_array_equal(found, shown_frames(layout, 12.0, frame_times))
    assert worst < 8


def test_a_long_video_gets_a_coarser_step_and_a_grid(tmp_path):
    """3 hours at 1.5 s clips would be 7200 tiles: the step grows to a whole number of clips, <= 400 tiles."""
    frame_times = np.arange(0, 3 * 3600, 25.0)  # one frame per 25 s: 432 frames
    video = tmp_path / "long.mp4"
    write_indexed_video(video, frame_times)
    layout = write_sprite(video, tmp_path / "long.jpg", clip_length=1.5, max_tiles=400)
    duration = frame_times[-1] + 25.0
    assert layout.seconds_per_tile == tile_step(duration, 1.5, 400) == 27.0
    assert tile_step(duration, 1.5, 400) == 1.5 * math.ceil(count_clips(duration, 1.5) / 400)
    assert layout.n_tiles == count_clips(duration, 27.0) == 400 and layout.tile_height == 120
    width, height = Image.open(tmp_path / "long.jpg").size
    assert (width, height) == sprite_size(layout) and max(width, height) < 2 * min(width, height)
    assert layout.columns > 1 and math.ceil(layout.n_tiles / layout.columns) > 1
    found, worst = tile_frames(tmp_path / "long.jpg", layout, len(frame_times))
    np.testing.assert_array_equal(found, shown_frames(layout, duration, frame_times))
    assert worst < 8


def test_time_to_tile_is_the_step_that_holds_the_time():
    layout = SpriteLayout(columns=3, tile_width=160, tile_height=90, n_tiles=8, seconds_per_tile=1.5,
                          first_tile_time=0.75)
    assert [tile_at(layout, t) for t in (-3.0, 0.0, 1.49, 1.5, 4.6, 11.99, 12.0, 500.0)] == [0, 0, 0, 1, 3, 7, 7, 7]
    for seconds in np.linspace(0, 12, 241)[:-1]:
        tile = tile_at(layout, seconds)
        assert tile * 1.5 <= seconds < (tile + 1) * 1.5 + 1e-9
        assert abs(layout.first_tile_time + tile * 1.5 - seconds) <= 0.75 + 1e-9  # its frame is its step's middle
    assert [tile_position(layout, t) for t in (0, 2, 3, 7)] == [(0, 0), (320, 0), (0, 90), (160, 180)]


@pytest.mark.parametrize("n_tiles", [1, 2, 7, 400, 5000, 7200])
@pytest.mark.parametrize("tile_size", [(160, 90), (160, 284), (160, 20)])
def test_grid_holds_every_tile_and_is_about_square(n_tiles, tile_size):
    tile_width, tile_height = tile_size
    columns = grid_columns(n_tiles, tile_width, tile_height)
    layout = SpriteLayout(columns, tile_width, tile_height, n_tiles, 1.5, 0.75)
    width, height = sprite_size(layout)
    positions = {tile_position(layout, tile) for tile in range(n_tiles)}
    assert len(positions) == n_tiles and all(x + tile_width <= width and y + tile_height <= height
                                             for x, y in positions)
    assert math.ceil(n_tiles / columns) * columns - n_tiles < columns  # no empty row
    if n_tiles >= 400:
        assert 0.5 < width / height < 2 and max(width, height) <= MAX_JPEG_SIDE


def test_an_undecodable_file_is_one_line_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 100)
    with pytest.raises(ThumbnailError) as error:
        write_sprite(bad, tmp_path / "bad.jpg", clip_length=1.5)
    assert str(bad) in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "bad.jpg").exists()


def test_video_file_takes_the_first_extension_that_exists(tmp_path):
    assert video_file(tmp_path, "a") is None
    (tmp_path / "a.webm").write_bytes(b"")
    assert video_file(tmp_path, "a") == str(tmp_path / "a.webm")
    (tmp_path / "a.mp4").write_bytes(b"")
    assert video_file(tmp_path, "a") == str(tmp_path / "a.mp4")
