"""HTTP endpoint and search page for a `Searcher`: a Flask app served by waitress.

    POST /search  {"text": "a query"} | {"desc_id": 123} | {"features": [[...], ...]}
                  optional "top_k" (1..100, default 10), "nms_thd" (0..1 or null), "truncate" (bool)
        200 {"results": [{"video_name", "start", "end", "score", "first_stage_rank"}, ...], "timing": {...}}
        4xx {"error": "<what is wrong>"}
    GET /         a page to type a query and see the ranked moments (and play them, see below)
    GET /info     the index: videos, runs, whether text queries and video playback are available
    GET /video/<name>  the video file, when the corpus's data config names a folder of videos ("video_dir",
                  relative to root_path; files <video_name>.mp4/.webm/.mkv/.mov); the page seeks to the moment

A moment's start and end are seconds of the whole video, also for a long video read as windows (the ranking
maps window clips back to video clips): the page shows them and seeks the whole video file to them as they are.

Flask + waitress: the search is synchronous, CPU-bound torch code, so an async framework would gain nothing;
waitress is a pure-Python production WSGI server with a request thread pool. The model is loaded once per
process (the `Searcher`); requests are parsed and validated concurrently and the searches run one at a time
(each uses every core). Bad requests get a 4xx with a one-line message; an unexpected failure is logged
with its traceback and answered 500 {"error": "internal error"}, never with the traceback.
"""
import logging
import os

import numpy as np
from flask import Flask, Response, jsonify, request, send_from_directory
from werkzeug.exceptions import HTTPException, NotFound

from method.search import MAX_TOP_K
from method.search_index import describe
from utils.errors import ConquerError

logger = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 8 * 2 ** 20
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov")
QUERY_KEYS = ("text", "desc_id", "features")
OPTION_KEYS = ("top_k", "nms_thd", "truncate")


class RequestError(ConquerError):
    """A request body that is not a valid search request; the message names the field."""


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
        except (TypeError, ValueError):
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


def create_app(searcher):
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    app.json.sort_keys = False  # rows keep their field order: video_name, start, end, score, first_stage_rank
    videos = video_folder(searcher)

    @app.post("/search")
    def search():
        body = request.get_json(silent=True)
        if body is None:
            raise RequestError("the request body must be JSON (Content-Type: application/json)")
        query, top_k, nms_thd, truncate = parse_request(body)
        moments, timing = searcher.search_batch([query], top_k, nms_thd, truncate)
        return jsonify(results=[m._asdict() for m in moments[0]],
                       timing={stage: round(seconds, 6) for stage, seconds in timing.items()})

    @app.get("/info")
    def info():
        return jsonify(**describe(searcher.index), text_queries=searcher.text_encoder is not None,
                       videos=videos is not None, max_top_k=MAX_TOP_K, max_query_tokens=searcher.max_query_tokens)

    @app.get("/video/<name>")
    def video(name):
        if videos is None or name not in searcher.index.position_of:
            raise NotFound(f"no video {name!r}")
        for extension in VIDEO_EXTENSIONS:
            if os.path.isfile(os.path.join(videos, name + extension)):
                return send_from_directory(videos, name + extension, conditional=True)
        raise NotFound(f"video {name!r} has no file in {videos}")

    @app.get("/")
    def page():
        return Response(PAGE, mimetype="text/html")

    @app.errorhandler(ConquerError)
    def bad_input(error):
        return jsonify(error=str(error)), 400

    @app.errorhandler(HTTPException)
    def http_error(error):
        return jsonify(error=f"{error.name}: {error.description}"), error.code

    @app.errorhandler(Exception)
    def internal_error(error):
        logger.exception("search request failed")
        return jsonify(error="internal error"), 500

    return app


def serve(searcher, host="127.0.0.1", port=8000, threads=8):
    """Serve `create_app(searcher)` until interrupted."""
    from waitress import serve as waitress_serve
    logger.info("serving %d videos on http://%s:%d/", len(searcher.index.video_names), host, port)
    waitress_serve(create_app(searcher), host=host, port=port, threads=threads)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>CONQUER moment search</title>
<style>
 body { font-family: sans-serif; margin: 2em; max-width: 60em; }
 input[type=text] { width: 30em; } table { border-collapse: collapse; margin-top: 1em; }
 td, th { padding: 0.2em 0.8em; text-align: left; } tr.moment { cursor: pointer; } tr.moment:hover { background: #eef; }
 #error { color: #b00; } video { display: none; max-width: 100%; margin-top: 1em; }
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
<video id="player" controls></video>
<script>
const $ = (id) => document.getElementById(id);
let canPlay = false;
fetch("/info").then(r => r.json()).then(info => {
  canPlay = info.videos;
  $("about").textContent = `${info.n_videos} videos`
    + (info.n_windows > info.n_videos ? ` (${info.n_windows} windows)` : "")
    + (info.text_queries ? "" : " (no text encoder: query by desc_id)");
  if (!info.text_queries) { $("kind").value = "desc_id"; }
});
function play(m) {  // m.start, m.end: seconds of the whole video file
  const player = $("player");
  player.src = `/video/${encodeURIComponent(m.video_name)}#t=${m.start},${m.end}`;
  player.style.display = "block";
  player.onloadedmetadata = () => { player.currentTime = m.start; player.play().catch(() => {}); };
}
$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("error").textContent = ""; $("results").innerHTML = "";
  const body = {top_k: parseInt($("top_k").value, 10)};
  const raw = $("query").value;
  body[$("kind").value] = $("kind").value === "desc_id" ? (raw.trim() === "" ? null : Number(raw)) : raw;
  if ($("nms_thd").value !== "") { body.nms_thd = parseFloat($("nms_thd").value); }
  const response = await fetch("/search", {method: "POST", headers: {"Content-Type": "application/json"},
                                           body: JSON.stringify(body)});
  const answer = await response.json();
  if (!response.ok) { $("error").textContent = answer.error; return; }
  const table = $("results");
  table.innerHTML = "<tr><th>#</th><th>video</th><th>start</th><th>end</th><th>score</th><th>1st stage</th></tr>";
  answer.results.forEach((m, i) => {
    const row = table.insertRow();
    row.className = "moment";
    [i + 1, m.video_name, m.start.toFixed(2), m.end.toFixed(2), m.score.toPrecision(4), m.first_stage_rank]
      .forEach(value => { row.insertCell().textContent = value; });
    if (canPlay) { row.onclick = () => play(m); }
  });
});
</script>
</body></html>
"""
