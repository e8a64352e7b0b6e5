"""HTTP endpoint and search page for a `Searcher`: a Flask app served by waitress.

    POST /search  {"text": "a query"} | {"desc_id": 123} | {"features": [[...], ...]}
                  optional "top_k" (1..100, default 10), "nms_thd" (0..1 or null), "truncate" (bool)
        200 {"results": [{"video_name", "start", "end", "score", "first_stage_rank"}, ...], "timing": {...},
             "videos": {video_name: {"duration": seconds or null, "thumbnails": sprite layout or null,
                                     "playable": bool}} of the videos in the results}
        400 {"error": "<what is wrong>"}  a bad query or body (names the field); 413 a body over 8 MiB
        500 {"error": "..."}              the server cannot answer (index out of date, unreadable store); logged
        503 {"error": "..."} + Retry-After  overloaded: the queue is full, or the request waited too long
    GET /health   200 {"status": "ok", "index", "version", "n_videos", "searching", "waiting", "max_queue"}
    GET /         a page to type a query and see the ranked moments (and play them, see below)
    GET /info     the index: names and ids of the index, runs and corpus (no server paths), whether text queries,
                  stored queries (desc_id) and video playback are available, how many videos have thumbnails
    GET /video/<name>  the video file, when the corpus's data config names a folder of videos ("video_dir",
                  relative to root_path; files <video_name>.mp4/.webm/.mkv/.mov); the page seeks to the moment
    GET /thumbnail/<name>  the video's thumbnail sprite (JPEG), made when the index was built from a corpus with a
                  "video_dir" (utils/thumbnails.py); its layout comes with the search results

The page shows each moment on its video's timeline (the whole video's duration, from the corpus's video table),
a thumbnail of the moment's middle (the sprite's tile holding that time, by CSS background-position), and on a
click plays the moment in place: the one <video> element moves under the clicked moment, seeks to its start and
pauses at its end. Without a video folder the page shows timelines only.

A build that updates the index (`build --update`, `index_videos`) is taken by the next search: the server keeps
its models and serves the new version (`Searcher.refresh`), so new videos are searchable without a restart.

A moment's start and end are seconds of the whole video, also for a long video read as windows (the ranking
maps window clips back to video clips): the page shows them and seeks the whole video file to them as they are.

Flask + waitress: the search is synchronous, CPU-bound torch code, so an async framework would gain nothing;
waitress is a pure-Python production WSGI server with a request thread pool. The model is loaded once per
process (the `Searcher`); requests are parsed and validated concurrently and the searches run one at a time
(each uses every core). Load is bounded: at most `max_queue` requests wait for the running search, each at most
`request_timeout` seconds; past either bound a request is answered 503 with a Retry-After at once, instead of
holding a thread and a connection while the queue grows. The limit is on the wait: a started search finishes.
Waitress refuses a body over MAX_REQUEST_BYTES before buffering it (its own default is 1 GiB). Bad requests
get a 400 with a one-line message; server-side failures a 500 (the one-line cause is logged, the client is not
shown server paths); an unexpected failure is logged with its traceback and answered 500
{"error": "internal error"}, never with the traceback.
"""
import contextlib
import json
import logging
import math
import os
import threading
import time

import numpy as np
from flask import Flask, Response, jsonify, request, send_file, send_from_directory
from werkzeug.exceptions import HTTPException, NotFound

from method.search import MAX_TOP_K, SERVE_MAX_QUEUE, SERVE_REQUEST_TIMEOUT, SERVE_THREADS, QueryError
from method.search_index import describe
from utils.errors import ConquerError, OptionError
from utils.io_utils import load_json
from utils.video_decoding import video_file
from utils.tvr_format import is_number

logger = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 8 * 2 ** 20
QUERY_KEYS = ("text", "desc_id", "features")
OPTION_KEYS = ("top_k", "nms_thd", "truncate")


class RequestError(ConquerError):
    """A request body that is not a valid search request; the message names the field."""


class Overloaded(Exception):
    """The server is too busy for this request now; `retry_after` seconds is a fair wait before retrying."""

    def __init__(self, message, retry_after):
        super().__init__(message)
        self.retry_after = retry_after


def retry_after_seconds(pending, search_seconds):
    """Whole seconds until `pending` searches of `search_seconds` each are likely done (at least 1)."""
    return max(1, math.ceil(pending * search_seconds))


class SearchQueue:
    """Runs searches one at a time with at most `max_queue` requests waiting, each for at most `timeout` seconds;
    a request past either bound gets `Overloaded` at once rather than joining an unbounded line."""

    def __init__(self, max_queue, timeout):
        self.max_queue, self.timeout = max_queue, timeout
        self._model = threading.Lock()
        self._counts = threading.Lock()
        self.pending = 0  # running + waiting
        self.last_search_seconds = 0.0

    @property
    def waiting(self):
        return max(self.pending - 1, 0)

    @contextlib.contextmanager
    def turn(self):
        """Hold the model for one search, or raise Overloaded."""
        with self._counts:
            if self.pending > self.max_queue:
                raise Overloaded(f"server busy: {self.waiting} requests already wait for the model (--max_queue "
                                 f"{self.max_queue}); retry later", self._retry_after())
            self.pending += 1
        try:
            if not self._model.acquire(timeout=self.timeout):
                raise Overloaded(f"server busy: waited {self.timeout:g} s for the model (--request_timeout "
                                 f"{self.timeout:g}); retry later", self._retry_after())
            started = time.perf_counter()
            try:
                yield
            finally:
                self.last_search_seconds = time.perf_counter() - started
                self._model.release()
        finally:
            with self._counts:
                self.pending -= 1

    def _retry_after(self):
        return retry_after_seconds(self.pending, self.last_search_seconds)


def parse_json_body(data):
    """Request body bytes -> JSON value; RequestError when it is not JSON."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the decoder's stack
        raise RequestError("the request body must be JSON (Content-Type: application/json), nested at most a "
                           "few hundred levels") from None


def parse_request(body):
    """JSON body -> (query, top_k, nms_thd, truncate); RequestError naming the field otherwise."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(set(body) - set(QUERY_KEYS) - set(OPTION_KEYS))
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; expected one of {list(QUERY_KEYS)} and optionally "
                           f"{list(OPTION_KEYS)}")
    given = [key for key in QUERY_KEYS if body.get(key) is not None]
    if len(given) != 1:
        raise RequestError(f"give exactly one of {list(QUERY_KEYS)}, got {given or 'none'}")
    key = given[0]
    query = body[key]
    if key == "text" and not isinstance(query, str):
        raise RequestError("'text' must be a string")
    if key == "desc_id" and (isinstance(query, bool) or not isinstance(query, int)):
        raise RequestError("'desc_id' must be an integer")
    if key == "features":
        if not (isinstance(query, list) and query and all(isinstance(row, list) for row in query)):
            raise RequestError("'features' must be a non-empty list of token feature rows")
        try:
            query = np.array(query, dtype=np.float32)
        except (TypeError, ValueError, RecursionError):
            raise RequestError("'features' must be a rectangular list of lists of numbers") from None
    top_k = body.get("top_k", 10)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
        raise RequestError(f"'top_k' must be an integer in [1, {MAX_TOP_K}], got {top_k!r}")
    nms_thd = body.get("nms_thd")
    if nms_thd is not None and (isinstance(nms_thd, bool) or not isinstance(nms_thd, (int, float))
                                or not 0 <= nms_thd <= 1):
        raise RequestError(f"'nms_thd' must be a number in [0, 1] or null, got {nms_thd!r}")
    truncate = body.get("truncate", False)
    if not isinstance(truncate, bool):
        raise RequestError("'truncate' must be true or false")
    return query, top_k, nms_thd, truncate


def video_folder(searcher):
    """Absolute folder of the corpus's videos (data config key "video_dir"), or None."""
    folder = searcher.data_config.get("video_dir")
    return os.path.join(searcher.data_config.root_path, folder) if folder else None


def video_durations(searcher):
    """{video name: duration in seconds} of the indexed split, from the corpus's video table (None where the table
    gives no positive number)."""
    table = load_json(searcher.dataset.video_duration_idx_path)[searcher.opt.eval_split_name]
    return {name: float(row[0]) if isinstance(row, list) and row and is_number(row[0]) and row[0] > 0 else None
            for name, row in table.items()}


def create_app(searcher, max_queue=SERVE_MAX_QUEUE, request_timeout=SERVE_REQUEST_TIMEOUT):
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    app.json.sort_keys = False  # rows keep their field order: video_name, start, end, score, first_stage_rank
    queue = SearchQueue(max_queue, request_timeout)
    served = {}

    def index_state():
        """What the routes show of the index version the searcher serves (it changes when a build updates the
        index: `Searcher.refresh`): its summary, video folder, durations and sprites, read once per version."""
        index = searcher.index
        if served.get("index") is not index:
            served.update(index=index, summary=describe(index), videos=video_folder(searcher),
                          durations=video_durations(searcher), thumbnails=index.thumbnails)
        return served

    def shown(name, state):
        """What the page needs to show a video: its duration, its sprite's layout, whether it has a file."""
        thumbnails, videos = state["thumbnails"], state["videos"]
        return dict(duration=state["durations"].get(name),
                    thumbnails=thumbnails[name][1] if name in thumbnails else None,
                    playable=videos is not None and video_file(videos, name) is not None)

    @app.post("/search")
    def search():
        if not request.is_json:
            raise RequestError("the request body must be JSON (Content-Type: application/json)")
        query, top_k, nms_thd, truncate = parse_request(parse_json_body(request.get_data(cache=False)))
        with queue.turn():
            searcher.refresh()
            moments, timing = searcher.search_batch([query], top_k, nms_thd, truncate)
            state = index_state()
        return jsonify(results=[m._asdict() for m in moments[0]],
                       timing={stage: round(seconds, 6) for stage, seconds in timing.items()},
                       videos={name: shown(name, state) for name in dict.fromkeys(m.video_name for m in moments[0])})

    @app.get("/health")
    def health():  # answered without the model lock: it reports a busy server instead of queueing behind it
        summary = index_state()["summary"]
        return jsonify(status="ok", index=summary["index"], version=summary["version"],
                       n_videos=summary["n_videos"], searching=queue.pending > 0, waiting=queue.waiting,
                       max_queue=max_queue)

    @app.get("/info")
    def info():
        state = index_state()
        return jsonify(**state["summary"], text_queries=searcher.text_encoder is not None,
                       desc_id_queries=bool(searcher.desc_of),
                       videos=state["videos"] is not None, thumbnails=len(state["thumbnails"]), max_top_k=MAX_TOP_K,
                       max_query_tokens=searcher.max_query_tokens)

    @app.get("/video/<name>")
    def video(name):
        videos = index_state()["videos"]
        if videos is None or name not in searcher.index.position_of:
            raise NotFound(f"no video {name!r}")
        path = video_file(videos, name)
        if path is None:
            raise NotFound(f"video {name!r} has no file in the server's video folder")
        return send_from_directory(videos, os.path.basename(path), conditional=True)

    @app.get("/thumbnail/<name>")
    def thumbnail(name):
        thumbnails = index_state()["thumbnails"]
        if name not in thumbnails:
            raise NotFound(f"video {name!r} has no thumbnails")
        return send_file(thumbnails[name][0], mimetype="image/jpeg", conditional=True)

    @app.get("/")
    def page():
        return Response(PAGE, mimetype="text/html")

    @app.errorhandler(QueryError)
    @app.errorhandler(RequestError)
    def bad_request(error):
        return jsonify(error=str(error)), 400

    @app.errorhandler(ConquerError)
    @app.errorhandler(OSError)
    def server_failure(error):
        # Not the client's fault (index out of date, a store that cannot be read): a 5xx, and its cause, which
        # names server paths, goes to the log only.
        logger.error("search request failed: %s: %s", type(error).__name__, error)
        return jsonify(error=f"the server cannot answer ({type(error).__name__}: its index or corpus is "
                             "unreadable or out of date); see the server log"), 500

    @app.errorhandler(Overloaded)
    def overloaded(error):
        return jsonify(error=str(error)), 503, {"Retry-After": str(error.retry_after)}

    @app.errorhandler(HTTPException)
    def http_error(error):
        return jsonify(error=f"{error.name}: {error.description}"), error.code

    @app.errorhandler(Exception)
    def internal_error(error):
        logger.exception("search request failed")
        return jsonify(error="internal error"), 500

    return app


def check_server_options(threads, max_queue, request_timeout):
    """OptionError naming the flag unless the settings can work: searches hold at most max_queue + 1 threads and
    one more must stay free to answer 503 and /health."""
    if max_queue < 0:
        raise OptionError(f"--max_queue {max_queue}: must be >= 0")
    if not request_timeout > 0:
        raise OptionError(f"--request_timeout {request_timeout}: must be > 0 seconds")
    if threads < max_queue + 2:
        raise OptionError(f"--threads {threads} must be at least --max_queue {max_queue} + 2 (one running search, "
                          f"{max_queue} waiting, one thread free to answer the others)")


def make_server(searcher, host="127.0.0.1", port=8000, threads=SERVE_THREADS, max_queue=SERVE_MAX_QUEUE,
                request_timeout=SERVE_REQUEST_TIMEOUT):
    """The waitress server of `create_app(searcher, ...)` (port 0: a free port, see `.effective_port`)."""
    from waitress.server import create_server
    check_server_options(threads, max_queue, request_timeout)
    return create_server(create_app(searcher, max_queue, request_timeout), host=host, port=port, threads=threads,
                         max_request_body_size=MAX_REQUEST_BYTES)


def serve(searcher, host="127.0.0.1", port=8000, threads=SERVE_THREADS, max_queue=SERVE_MAX_QUEUE,
          request_timeout=SERVE_REQUEST_TIMEOUT):
    """Serve `create_app(searcher)` until interrupted."""
    server = make_server(searcher, host, port, threads, max_queue, request_timeout)
    logger.info("serving %d videos on http://%s:%s/", len(searcher.index.video_names), host, server.effective_port)
    server.run()


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>CONQUER moment search</title>
<style>
 body { font-family: sans-serif; margin: 2em; max-width: 75em; }
 input[type=text] { width: 30em; } table { border-collapse: collapse; margin-top: 1em; }
 td, th { padding: 0.2em 0.8em; text-align: left; vertical-align: middle; }
 tr.moment.playable { cursor: pointer; } tr.moment.playable:hover { background: #eef; }
 #error { color: #b00; } #player { max-width: 100%; max-height: 24em; }
 .thumb { background-repeat: no-repeat; }
 .timeline { position: relative; width: 16em; height: 14px; background: rgb(200, 200, 200); }
 .marker { position: absolute; top: 0; height: 100%; min-width: 3px; background: rgb(220, 30, 30); }
 .playhead { position: absolute; top: -3px; height: 20px; width: 2px; background: rgb(20, 20, 20); display: none; }
</style></head>
<body>
<h1>Moment search</h1>
<p id="about"></p>
<form id="form">
 <select id="kind"><option value="text">text</option><option value="desc_id">desc_id</option></select>
 <input type="text" id="query" placeholder="a man opens a door" autofocus>
 top <input type="number" id="top_k" value="10" min="1" max="100" style="width: 4em">
 NMS <input type="number" id="nms_thd" step="0.05" min="0" max="1" placeholder="off" style="width: 4em">
 <button type="submit" id="go">Search</button>
</form>
<p id="error"></p>
<table id="results"></table>
<video id="player" controls preload="metadata" hidden></video>
<script>
const $ = (id) => document.getElementById(id);
const COLUMNS = 8;
fetch("/info").then(r => r.json()).then(info => {
  $("about").textContent = `${info.n_videos} videos`
    + (info.n_windows > info.n_videos ? ` (${info.n_windows} windows)` : "")
    + (info.text_queries ? "" : " (no text encoder: query by desc_id)");
  if (!info.text_queries) { $("kind").value = "desc_id"; }
  if (!info.desc_id_queries) { $("kind").querySelector("option[value=desc_id]").remove(); }
});
// The sprite's tile that shows time t (seconds): the tile of the step holding t (utils/thumbnails.py tile_at).
function tileAt(layout, t) {
  return Math.min(layout.n_tiles - 1, Math.max(0, Math.floor(t / layout.seconds_per_tile)));
}
const sprites = {};  // video name -> Image, loaded once per page
function thumbnail(name, layout, t) {
  const box = document.createElement("div");
  box.className = "thumb";
  const tile = tileAt(layout, t);
  box.dataset.tile = tile;
  box.style.width = `${layout.tile_width}px`; box.style.height = `${layout.tile_height}px`;
  const url = `/thumbnail/${encodeURIComponent(name)}`;
  box.style.backgroundImage = `url("${url}")`;
  box.style.backgroundPosition = `-${(tile % layout.columns) * layout.tile_width}px `
    + `-${Math.floor(tile / layout.columns) * layout.tile_height}px`;
  if (!sprites[name]) { sprites[name] = new Image(); sprites[name].src = url; }
  const image = sprites[name];
  const mark = () => box.classList.add(image.naturalWidth > 0 ? "loaded" : "failed");
  if (image.complete) { mark(); } else { image.addEventListener("load", mark); image.addEventListener("error", mark); }
  return box;
}
// A bar for the whole video with the moment marked; times are seconds of the whole video (also for windows).
function timeline(m, duration) {
  const bar = document.createElement("div");
  bar.className = "timeline";
  bar.title = `${m.start.toFixed(2)}-${m.end.toFixed(2)} s of ${duration.toFixed(2)} s`;
  const marker = document.createElement("div");
  marker.className = "marker";
  const start = Math.min(m.start, duration), end = Math.min(m.end, duration);  // the last clip may overhang
  marker.style.left = `${100 * start / duration}%`;
  marker.style.width = `${100 * (end - start) / duration}%`;
  const playhead = document.createElement("div");
  playhead.className = "playhead";
  bar.append(marker, playhead);
  return bar;
}
let stopAt = null;
// Play the moment in place: the player moves into a row under the moment's row, seeks to the start and pauses
// at the end (the media fragment asks the browser for both; the timeupdate check covers browsers that do not).
function play(row, m, duration) {
  const player = $("player");
  let holder = player.closest("tr.player-row");
  if (!holder) {
    holder = document.createElement("tr");
    holder.className = "player-row";
    const cell = holder.insertCell();
    cell.colSpan = COLUMNS;
    cell.appendChild(player);
  }
  row.after(holder);
  const playhead = row.querySelector(".playhead");
  document.querySelectorAll(".playhead").forEach(p => { p.style.display = "none"; });
  stopAt = m.end;
  player.hidden = false;
  player.src = `/video/${encodeURIComponent(m.video_name)}#t=${m.start},${m.end}`;
  player.onloadedmetadata = () => { player.currentTime = m.start; player.play().catch(() => {}); };
  player.ontimeupdate = () => {
    if (stopAt !== null && player.currentTime >= stopAt) { player.pause(); stopAt = null; }
    if (playhead && duration) {
      playhead.style.display = "block";
      playhead.style.left = `${100 * Math.min(player.currentTime / duration, 1)}%`;
    }
  };
}
$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("error").textContent = "";
  const player = $("player");
  player.pause(); player.hidden = true; document.body.appendChild(player);
  $("results").innerHTML = "";
  const body = {top_k: parseInt($("top_k").value, 10)};
  const raw = $("query").value;
  body[$("kind").value] = $("kind").value === "desc_id" ? (raw.trim() === "" ? null : Number(raw)) : raw;
  if ($("nms_thd").value !== "") { body.nms_thd = parseFloat($("nms_thd").value); }
  const response = await fetch("/search", {method: "POST", headers: {"Content-Type": "application/json"},
                                           body: JSON.stringify(body)});
  const answer = await response.json();
  if (!response.ok) { $("error").textContent = answer.error; return; }
  const table = $("results");
  table.innerHTML = "<tr><th>#</th><th>video</th><th>start</th><th>end</th><th>score</th><th>1st stage</th>"
    + "<th>moment</th><th>in the video</th></tr>";
  answer.results.forEach((m, i) => {
    const video = answer.videos[m.video_name];
    const row = table.insertRow();
    row.className = "moment";
    [i + 1, m.video_name, m.start.toFixed(2), m.end.toFixed(2), m.score.toPrecision(4), m.first_stage_rank]
      .forEach(value => { row.insertCell().textContent = value; });
    const middle = (m.start + (video.duration ? Math.min(m.end, video.duration) : m.end)) / 2;
    const thumbCell = row.insertCell();
    if (video.thumbnails) { thumbCell.appendChild(thumbnail(m.video_name, video.thumbnails, middle)); }
    const timelineCell = row.insertCell();
    if (video.duration) { timelineCell.appendChild(timeline(m, video.duration)); }
    if (video.playable) {
      row.classList.add("playable");
      row.onclick = () => play(row, m, video.duration);
    }
  });
});
</script>
</body></html>
"""
