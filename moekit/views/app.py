"""The live app: a local page where you type a prompt and see how a composed model routes each of its tokens.

The server is the standard library's (`http.server`): one model loaded once, requests served one at a time under a
lock. The page for a prompt is the static report's template with the app's form filled into one of its blocks, and
the JSON answer holds the same reductions; the only model work here is the optional greedy continuation of the
prompt, everything else is `capture_routing`.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import socket
import threading
import warnings
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import torch

from ..analysis import (
    AnalysisError, RoutingTrace, capture_routing, dead_experts, dominant_expert_per_token, gate_strength,
    layer_agreement, mean_token_entropy, utilisation,
)
from ..runtime.assembly.config import require_composed
from ..loading import load, load_tokenizer
from ..runtime.assembly.modeling import MixtureKitForCausalLM
from .html_report import render_template, report_context

logger = logging.getLogger(__name__)

MAX_TOKENS = 512  # tokens analysed per request (prompt + continuation); longer texts are cut, and the answer says so
MAX_GENERATE = 256  # the most new tokens one request may ask for
MAX_BODY_BYTES = 1 << 20


class BadRequest(Exception):
    """A request the app refuses, with the HTTP status and a message that says what would be valid."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


@dataclass
class Analysis:
    """One request's result: the trace of prompt + continuation, and what was asked for and generated."""

    trace: RoutingTrace
    prompt: str
    requested_tokens: int
    generated_text: str
    generated_tokens: int


def load_composed(checkpoint: str | Path, device: str | None = None) -> tuple[MixtureKitForCausalLM, Any]:
    """The composed model (eval mode) and its tokenizer; a dense or unreadable checkpoint is refused before any
    weight is read."""
    require_composed(checkpoint, "routing views show how a Mixture-of-Experts routes tokens", AnalysisError)
    tokenizer = load_tokenizer(checkpoint, "routing views need one to split text into tokens")
    return load(checkpoint, device=device), tokenizer


class RoutingApp:
    """What the server does, apart from HTTP: analyse a text (optionally continued), as HTML or as JSON."""

    def __init__(self, model: MixtureKitForCausalLM, tokenizer, title: str, generate_tokens: int = 0):
        self.model, self.tokenizer, self.title = model, tokenizer, title
        try:
            self.generate_tokens = _check_generate(generate_tokens)
        except BadRequest as error:
            raise AnalysisError(f"generate_tokens: {error}") from None
        self.lock = threading.Lock()

    def analyse(self, text: Any, generate: Any = None) -> Analysis:
        """Validate the request, continue the prompt greedily by `generate` tokens if asked, and capture routing."""
        if not isinstance(text, str) or not text.strip():
            raise BadRequest("the text is empty: give some text to analyse (form field or JSON key 'text')")
        new_tokens = self.generate_tokens if generate in (None, "") else _check_generate(generate)
        with self.lock:  # one model, one request at a time (the tokenizer is not thread-safe either)
            continuation, count = self._continue(text, new_tokens) if new_tokens else ("", 0)
            trace = capture_routing(self.model, self.tokenizer, [text + continuation], max_tokens=MAX_TOKENS)
        return Analysis(trace, text, new_tokens, continuation, count)

    @torch.inference_mode()
    def _continue(self, prompt: str, new_tokens: int) -> tuple[str, int]:
        """Greedy continuation (stops early at end-of-sequence): its text and its number of tokens."""
        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][:, -MAX_TOKENS:]
        ids = ids.to(self.model.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        output = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     do_sample=False, num_beams=1, pad_token_id=pad)
        new = output[0, ids.shape[1]:].tolist()
        # Decode prompt and whole sequence alike, so a character split across the boundary is not lost.
        head = self.tokenizer.decode(ids[0].tolist(), skip_special_tokens=True)
        whole = self.tokenizer.decode(ids[0].tolist() + new, skip_special_tokens=True)
        text = whole[len(head):] if whole.startswith(head) else self.tokenizer.decode(new, skip_special_tokens=True)
        return text, len(new)

    def report_html(self, analysis: Analysis) -> str:
        """`render_report` of the trace, with a form to analyse another text above it (`app_report.html.j2`)."""
        return render_template("app_report.html.j2", **report_context(analysis.trace, self.title),
                               prompt=analysis.prompt, generate=analysis.requested_tokens, max_generate=MAX_GENERATE)

    def report_json(self, analysis: Analysis) -> dict:
        """The reductions every view shows, as plain JSON (NaN becomes null)."""
        trace = analysis.trace
        routed = not trace.routes.empty
        payload = {
            "method": trace.method,
            "experts": trace.expert_names,
            "text": trace.texts[0],
            "prompt": analysis.prompt,
            "generated_text": analysis.generated_text,
            "generated_tokens": analysis.generated_tokens,
            "truncated": bool(trace.truncated[0]),
            "max_tokens": trace.max_tokens,
            "tokens": _tokens(trace),
            "utilisation": utilisation(trace).to_dict(orient="index") if routed else {},
            "mean_token_entropy": mean_token_entropy(trace).to_dict() if routed else {},
            "dead_experts": dead_experts(trace) if routed else {},
            "layer_agreement": layer_agreement(trace) if routed else None,
            "gate_strength": gate_strength(trace).reset_index().to_dict(orient="records") if len(trace.gates) else [],
        }
        return _plain(payload)

    def index_html(self) -> str:
        """The start page: which model is served, and the form (`app_index.html.j2`)."""
        config = self.model.config
        about = (f"{config.method} model, {len(config.expert_names)} experts "
                 f"({', '.join(config.expert_names)}), top-{config.num_experts_per_tok}")
        return render_template("app_index.html.j2", title=self.title, about=about, generate=self.generate_tokens,
                               max_generate=MAX_GENERATE)


def _check_generate(value: Any) -> int:
    if isinstance(value, bool):
        raise BadRequest(f"'generate' must be a whole number from 0 to {MAX_GENERATE}, got {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"'generate' must be a whole number from 0 to {MAX_GENERATE}, got {value!r}") from None
    if not 0 <= number <= MAX_GENERATE or (isinstance(value, float) and number != value):
        raise BadRequest(f"'generate' must be a whole number from 0 to {MAX_GENERATE}, got {value!r}")
    return number


def _tokens(trace: RoutingTrace) -> list[dict]:
    """Per token: its text and offsets, and (when there are routers) the expert with the highest mean probability."""
    if trace.routes.empty:
        first = trace.gates.drop_duplicates("position").sort_values("position") if len(trace.gates) else trace.gates
        return [{"position": int(row.position), "token": row.token} for row in first.itertuples()]
    spans = trace.routes.drop_duplicates("position").set_index("position")
    return [{"position": int(row.position), "token": row.token, "start": int(spans.at[row.position, "start"]),
             "end": int(spans.at[row.position, "end"]), "dominant": row.dominant, "probability": row.probability}
            for row in dominant_expert_per_token(trace).itertuples()]


def _plain(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python numbers, non-finite floats to None, tuple keys to strings."""
    if isinstance(value, dict):
        return {(" / ".join(map(str, k)) if isinstance(k, tuple) else str(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    server_version = "MixtureKitApp"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if urlsplit(self.path).path not in ("/", "/index.html"):
            return self._error(BadRequest(f"no page at {self.path}: open / or POST to /analyse",
                                          HTTPStatus.NOT_FOUND))
        self._send(HTTPStatus.OK, "text/html; charset=utf-8", self.server.app.index_html())

    def do_POST(self) -> None:  # noqa: N802
        try:
            if urlsplit(self.path).path != "/analyse":
                raise BadRequest(f"cannot POST to {self.path}: POST to /analyse", HTTPStatus.NOT_FOUND)
            text, generate = self._read_request()
            app = self.server.app
            analysis = app.analyse(text, generate)
            if self._wants_json():
                content_type, body = "application/json", json.dumps(app.report_json(analysis), allow_nan=False)
            else:
                content_type, body = "text/html; charset=utf-8", app.report_html(analysis)
        except BadRequest as error:
            return self._error(error)
        except AnalysisError as error:
            return self._error(BadRequest(str(error)))
        except Exception as error:  # an unexpected failure must answer, not hang the page
            logger.exception("the analysis of a request failed")
            return self._error(BadRequest(f"the analysis failed: {type(error).__name__}: {error}",
                                          HTTPStatus.INTERNAL_SERVER_ERROR))
        self._send(HTTPStatus.OK, content_type, body)

    def _read_request(self) -> tuple[Any, Any]:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise BadRequest("the request needs a Content-Length header", HTTPStatus.LENGTH_REQUIRED)
        if int(length) > MAX_BODY_BYTES:
            raise BadRequest(f"the request body is {length} bytes; the most the app accepts is {MAX_BODY_BYTES}",
                             HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        try:
            raw = self.rfile.read(int(length)).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("the request body is not UTF-8 text") from None
        kind = self.headers.get_content_type()
        if kind == "application/json":
            try:
                data = json.loads(raw)
            except ValueError as error:
                raise BadRequest(f"the body is not valid JSON: {error}") from None
            if not isinstance(data, dict):
                raise BadRequest('send a JSON object: {"text": "...", "generate": 0}')
            return data.get("text"), data.get("generate")
        if kind == "application/x-www-form-urlencoded":
            fields = parse_qs(raw, keep_blank_values=True)
            text = fields.get("text", [""])[0].replace("\r\n", "\n")  # browsers send textarea lines as CRLF
            return text, fields.get("generate", [None])[0]
        raise BadRequest(f"cannot read a {kind} body: send application/json or a form (x-www-form-urlencoded)",
                         HTTPStatus.UNSUPPORTED_MEDIA_TYPE)

    def _wants_json(self) -> bool:
        return "application/json" in self.headers.get("Accept", "")

    def _error(self, error: BadRequest) -> None:
        if self._wants_json():
            self._send(error.status, "application/json", json.dumps({"error": str(error)}))
        else:
            self._send(error.status, "text/plain; charset=utf-8", f"{error.status.value} {error.status.phrase}: "
                                                                  f"{error}\n")

    def _send(self, status: HTTPStatus, content_type: str, body: str) -> None:
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        logger.info("%s - %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: RoutingApp):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.app = app
        super().__init__(address, _Handler)


class AppServer:
    """A running app: `url`, `port`, `close()` (also on leaving a `with` block), `wait()` to block until closed."""

    def __init__(self, httpd: _Server):
        self.httpd, self.app = httpd, httpd.app
        self.host, self.port = httpd.server_address[:2]
        self._thread = threading.Thread(target=httpd.serve_forever, name=f"moekit-app:{self.port}", daemon=True)
        self._thread.start()
        self._closed = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def wait(self) -> None:
        """Block until the server is closed (a short join loop, so Ctrl-C reaches the caller)."""
        while self._thread.is_alive():
            self._thread.join(0.5)

    def close(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()

    shutdown = close

    def __enter__(self) -> "AppServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 0, generate_tokens: int = 0,
          device: str | None = None) -> AppServer:
    """Load the composed `checkpoint` once and serve the app on `host:port` (0: any free port) in a background thread.

    `generate_tokens` is the form's default number of new tokens. Returns the running server (see `AppServer`).
    A dense checkpoint is refused here, before anything is served.
    """
    model, tokenizer = load_composed(checkpoint, device)
    name = Path(str(checkpoint)).name or str(checkpoint)
    app = RoutingApp(model, tokenizer, title=f"Routing of {name}", generate_tokens=generate_tokens)
    if not _is_loopback(host):
        warnings.warn(f"serving on {host}: the app has no authentication, so anyone who can reach this address can "
                      "run the model; bind to 127.0.0.1 unless you mean to share it", stacklevel=2)
    return AppServer(_Server((host, port), app))
