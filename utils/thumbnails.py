"""Thumbnail sprites of videos: one JPEG per video holding a small frame every few seconds, for the search page.

    layout = write_sprite("videos/v1.mp4", "thumbnails/v1.jpg", clip_length=1.5)   # -> SpriteLayout
    tile = tile_at(layout, 42.0)             # the tile that shows second 42 of the video
    x, y = tile_position(layout, tile)       # its top-left pixel in the sprite (CSS: background-position -x -y)

Tiles come at a fixed time step: one per clip of `clip_length` (the corpus's clips), or for a video of more than
`max_tiles` clips one per a whole number of clips, so that a sprite holds at most `max_tiles` tiles (a 3-hour
video, 1.5 s clips, 400 tiles: one tile per 27 s; 16:9 frames make a sprite of about 2400 x 2400 px). Tile i
shows the frame on screen at the middle of [i * step, (i + 1) * step), the last step stopping at the end of the
video: the frames utils/video_decoding.py samples for one frame per clip of length `step`. `tile_at` maps a time
to the tile of the step that holds it. Tiles are `tile_width` px wide and as high as the video's aspect ratio makes
them, laid out row by row on a grid whose column count makes the sprite about square (a JPEG side is at most
65535 px).

PyAV and Pillow are imported by `write_sprite` only: the layout functions work in a core install
(the search server uses them).
"""
import math
from typing import NamedTuple

from utils.errors import ConquerError
from utils.io_utils import atomic_write
from utils.video_decoding import VideoDecodeError, count_clips, iter_clip_chunks, probe_duration

TILE_WIDTH = 160
MAX_TILES = 400
JPEG_QUALITY = 85
MAX_JPEG_SIDE = 65535
_CLIPS_PER_CHUNK = 8  # full-size frames held in memory while a sprite is built


class ThumbnailError(ConquerError):
    """A video's sprite cannot be made (the file cannot be decoded, absurd frame size); names the file."""


class SpriteLayout(NamedTuple):
    columns: int
    tile_width: int  # px
    tile_height: int  # px
    n_tiles: int
    seconds_per_tile: float  # the time step: tile i covers [i * step, (i + 1) * step)
    first_tile_time: float  # seconds: tile 0 shows the frame at this time, the middle of its step


def tile_step(duration, clip_length, max_tiles=MAX_TILES):
    """Seconds per tile: `clip_length`, or the smallest whole number of clips that keeps the tiles of `duration`
    seconds within `max_tiles`."""
    return clip_length * math.ceil(count_clips(duration, clip_length) / max_tiles)


def grid_columns(n_tiles, tile_width, tile_height):
    """Columns of an about square grid of `n_tiles` tiles of tile_width x tile_height px (1..n_tiles)."""
    return min(n_tiles, max(1, math.ceil(math.sqrt(n_tiles * tile_height / tile_width))))


def tile_at(layout, seconds):
    """The tile of the step holding time `seconds` (times before the video: tile 0; after it: the last)."""
    return min(layout.n_tiles - 1, max(0, math.floor(seconds / layout.seconds_per_tile)))


def tile_position(layout, tile):
    """(x, y) px of the top-left corner of `tile` in the sprite."""
    return (tile % layout.columns) * layout.tile_width, (tile // layout.columns) * layout.tile_height


def sprite_size(layout):
    """(width, height) px of the sprite of `layout`."""
    return layout.columns * layout.tile_width, math.ceil(layout.n_tiles / layout.columns) * layout.tile_height


def write_sprite(video_path, sprite_path, clip_length, tile_width=TILE_WIDTH, max_tiles=MAX_TILES,
                 quality=JPEG_QUALITY):
    """Decode `video_path` and write its sprite to `sprite_path` (JPEG, atomically) -> SpriteLayout.
    ThumbnailError (one line naming the file) when the video cannot be decoded; nothing is written then."""
    from PIL import Image

    try:
        duration = probe_duration(video_path)
        step = tile_step(duration, clip_length, max_tiles)
        layout, sprite = None, None
        for chunk in iter_clip_chunks(video_path, step, frames_per_clip=1, clips_per_chunk=_CLIPS_PER_CHUNK):
            if sprite is None:
                layout = _layout(video_path, chunk.frames.shape[2:4], count_clips(duration, step), step, duration,
                                 tile_width)
                sprite = Image.new("RGB", sprite_size(layout))
            for i, frame in enumerate(chunk.frames[:, 0], start=chunk.first_clip):
                tile = Image.fromarray(frame).resize((layout.tile_width, layout.tile_height),
                                                     Image.Resampling.BILINEAR)
                sprite.paste(tile, tile_position(layout, i))
    except VideoDecodeError as e:
        raise ThumbnailError(f"no thumbnails: {e}") from None
    with atomic_write(sprite_path) as f:
        sprite.save(f, format="JPEG", quality=quality)
    return layout


def _layout(video_path, frame_shape, n_tiles, step, duration, tile_width):
    height, width = frame_shape
    tile_height = max(1, round(tile_width * height / width))
    layout = SpriteLayout(grid_columns(n_tiles, tile_width, tile_height), tile_width, tile_height, n_tiles, step,
                          min(step, duration) / 2)
    if max(sprite_size(layout)) > MAX_JPEG_SIDE:
        raise ThumbnailError(f"no thumbnails: {video_path}: frames of {width} x {height} px make a sprite of "
                             f"{sprite_size(layout)} px, over the JPEG limit of {MAX_JPEG_SIDE} px a side")
    return layout
