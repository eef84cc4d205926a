"""Real object-storage servers on loopback, started by the tests themselves (DESIGN.md section 10).

* :class:`MotoS3Server`: moto's ``ThreadedMotoServer`` on 127.0.0.1 and a random port. moto keeps its state in
  process-wide backends, not in the server, so :meth:`MotoS3Server.stop` / :meth:`MotoS3Server.start` (same port)
  model an outage: the data is still there when the server comes back.
* :class:`GcsEmulator`: ``gcp-storage-emulator`` in memory on 127.0.0.1 and a random port, with preconditions
  enforced. The emulator ignores ``ifGenerationMatch`` entirely, so without the enforcement a GCS put-if-absent test
  would pass while proving nothing.
* :class:`StoreLocation`: what a test needs to open a store there: ``url`` and ``storage_options``.

Terms: an *endpoint* is the ``http://127.0.0.1:PORT`` base URL of a server; a *location* is a store URL plus the
fsspec options that reach it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from http.server import HTTPServer
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qs, urlsplit

# Dummy credentials: moto accepts any; they must never be real ones.
AWS_ACCESS_KEY_ID = "fracstore-test-key"
AWS_SECRET_ACCESS_KEY = "fracstore-test-secret"
AWS_REGION = "us-east-1"


@dataclass(frozen=True, slots=True)
class StoreLocation:
    """Where a test store lives: ``Store.open(loc.url, storage_options=loc.storage_options)``.

    Attributes:
        name: the backend kind (``"local"``, ``"memory"``, ``"s3"``, ``"gcs"``), for test ids and messages.
        url: the store URL (a local path for ``"local"``).
        endpoint: the server's base URL for ``"s3"`` / ``"gcs"``, else None.
    """

    name: str
    url: str
    options: Mapping[str, Any] = field(default_factory=dict)
    endpoint: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    @property
    def storage_options(self) -> dict[str, Any]:
        """The fsspec options, as a fresh dict each time (a test that adds to it changes no other test)."""
        return dict(self.options)


def _request(method: str, url: str, *, headers: Mapping[str, str] | None = None, timeout: float = 10.0) -> bytes:
    request = urllib.request.Request(url, method=method, headers=dict(headers or {}))
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return bytes(response.read())


# -- S3 ---------------------------------------------------------------------------------------------------------


class _LoopbackServer:
    """What the test servers share: a port on 127.0.0.1 kept across restarts, so endpoints handed out before an
    outage stay valid after it. Subclasses implement start, stop and running."""

    _port: int

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    @property
    def endpoint(self) -> str:
        if not self._port:
            raise RuntimeError(f"the {type(self).__name__} was never started")
        return f"http://127.0.0.1:{self._port}"

    @contextlib.contextmanager
    def stopped(self) -> Iterator[None]:
        """Stop the server for the ``with`` body, then start it again on the same port (its data survives)."""
        self.stop()
        try:
            yield
        finally:
            self.start()


class MotoS3Server(_LoopbackServer):
    """A moto S3 server that can be stopped and started again on the same port.

    The first :meth:`start` binds a random free port; later starts reuse it, so URLs and storage options handed
    out before an outage stay valid after it.
    """

    def __init__(self) -> None:
        self._server: Any = None
        self._port = 0

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        if self._server is not None:
            return
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self._port, verbose=False)
        server.start()
        self._port = server.get_host_and_port()[1]
        self._server = server

    def stop(self) -> None:
        """Stop serving and close the listening socket, so clients get "connection refused" at once instead of a
        connection the kernel accepts and nobody answers (ThreadedMotoServer.stop leaves the socket open)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.stop()
        server._server.server_close()

    def reset(self) -> None:
        """Forget every bucket and object (moto's own reset API)."""
        _request("POST", f"{self.endpoint}/moto-api/reset")

    def create_bucket(self, bucket: str) -> None:
        # moto does not check signatures, only reads the service from the credential scope, so a plain PUT with
        # an unsigned header creates the bucket (no boto3 client start-up).
        scope = f"Credential={AWS_ACCESS_KEY_ID}/20260101/{AWS_REGION}/s3/aws4_request"
        _request("PUT", f"{self.endpoint}/{bucket}", headers={"Authorization": f"AWS4-HMAC-SHA256 {scope}"})

    def storage_options(self) -> dict[str, Any]:
        """What s3fs needs to reach this server; the region comes from AWS_DEFAULT_REGION."""
        return {"endpoint_url": self.endpoint, "key": AWS_ACCESS_KEY_ID, "secret": AWS_SECRET_ACCESS_KEY}

    def location(self, bucket: str, prefix: str = "store") -> StoreLocation:
        return StoreLocation("s3", f"s3://{bucket}/{prefix}", self.storage_options(), self.endpoint)


# -- GCS --------------------------------------------------------------------------------------------------------

_PRECONDITION_FAILED_BODY = json.dumps(
    {
        "error": {
            "code": 412,
            "message": "At least one of the pre-conditions you specified did not hold.",
            "errors": [
                {
                    "domain": "global",
                    "reason": "conditionNotMet",
                    "message": "At least one of the pre-conditions you specified did not hold.",
                    "locationType": "header",
                    "location": "If-Match",
                }
            ],
        }
    }
).encode()


class _PreconditionFailedError(Exception):
    pass


_refusing = threading.local()


class _QuietRefusals(logging.Filter):
    """Drop the emulator router's "An error has occurred" records for a 412 this module raises on purpose; any
    other emulator error still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_refusing, "active", False)


def _install_log_filter() -> None:
    logger = logging.getLogger("gcp_storage_emulator.server")
    if not any(isinstance(f, _QuietRefusals) for f in logger.filters):
        logger.addFilter(_QuietRefusals())


def _make_handler_class() -> type:
    from gcp_storage_emulator.server import RequestHandler

    class PreconditionHandler(RequestHandler):  # type: ignore[misc]
        """The emulator's request handler, with the request's query made visible to the storage layer and a
        failed precondition answered with 412 like real GCS."""

        def __init__(self, emulator: GcsEmulator, *args: Any, **kwargs: Any) -> None:
            self._emulator = emulator
            super().__init__(emulator.storage, *args, **kwargs)

        def _route(self, route: Any) -> None:
            query = parse_qs(urlsplit(self.path).query)
            self._emulator._context.query = query
            try:
                route(self)
            except _PreconditionFailedError:
                self.send_response(HTTPStatus.PRECONDITION_FAILED.value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(_PRECONDITION_FAILED_BODY)))
                self.end_headers()
                self.wfile.write(_PRECONDITION_FAILED_BODY)
            finally:
                self._emulator._context.query = {}
                _refusing.active = False

        def do_POST(self) -> None:  # noqa: N802 - http.server dispatches on this name
            self._route(RequestHandler.do_POST)

        def do_PUT(self) -> None:  # noqa: N802 - http.server dispatches on this name
            self._route(RequestHandler.do_PUT)

        def do_DELETE(self) -> None:  # noqa: N802 - http.server dispatches on this name
            # Cancelling a resumable upload (gcsfs does so after any failed chunk, including a 412 at completion):
            # the emulator has no route for it and would answer 501, which gcsfs retries for half a minute and
            # then reports instead of the 412. Real GCS answers 499, which gcsfs treats as success.
            parts = urlsplit(self.path)
            upload_id = parse_qs(parts.query).get("upload_id")
            if parts.path.startswith("/upload/") and upload_id:
                self._emulator._cancel_upload(upload_id[0])
                self.send_response(499, "Client Closed Request")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._route(RequestHandler.do_DELETE)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return PreconditionHandler


def _make_storage_class() -> type:
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.storage import Storage

    class PreconditionStorage(Storage):  # type: ignore[misc]
        """The emulator's in-memory storage with ``ifGenerationMatch`` enforced on every object write.

        Every upload path ends in :meth:`create_file` (simple and multipart uploads directly; resumable uploads
        when their last chunk arrives), so checking there covers them all. A resumable upload remembers the
        precondition it was initiated with, checked again at completion: an object created between initiation
        and the last chunk makes the upload fail, as on real GCS.
        """

        def __init__(self, emulator: GcsEmulator) -> None:
            super().__init__(use_memory_fs=True)
            self._emulator = emulator
            self.pending_preconditions: dict[str, str] = {}

        def _check(self, bucket_name: str, file_name: str, expected: str | None) -> None:
            if expected is None or not self._emulator.enforce_preconditions:
                return
            try:
                current = str(self.get_file_obj(bucket_name, file_name)["generation"])
            except NotFound:
                current = "0"
            if current != expected:
                _refusing.active = True
                raise _PreconditionFailedError(f"{bucket_name}/{file_name}: generation {current}, expected {expected}")

        def _requested(self) -> str | None:
            values = getattr(self._emulator._context, "query", {}).get("ifGenerationMatch")
            return values[0] if values else None

        def create_file(
            self, bucket_name: str, file_name: str, content: bytes, file_obj: dict[str, Any], file_id: Any = None
        ) -> None:
            with self._emulator.lock:
                if file_id:
                    expected = self.pending_preconditions.pop(file_id, None)
                    self._emulator.uploads["resumable"] += 1
                else:
                    expected = self._requested()
                    self._emulator.uploads["simple"] += 1
                self._check(bucket_name, file_name, expected)
                super().create_file(bucket_name, file_name, content, file_obj, file_id)

        def create_resumable_upload(self, bucket_name: str, file_name: str, file_obj: dict[str, Any]) -> str:
            with self._emulator.lock:
                expected = self._requested()
                self._check(bucket_name, file_name, expected)  # real GCS refuses at initiation too
                upload_id: str = super().create_resumable_upload(bucket_name, file_name, file_obj)
                if expected is not None:
                    self.pending_preconditions[upload_id] = expected
                return upload_id

    return PreconditionStorage


class GcsEmulator(_LoopbackServer):
    """gcp-storage-emulator in memory on loopback, with ``ifGenerationMatch`` enforced.

    Why in-process subclasses of the emulator's handler and storage rather than a proxy: every upload path of the
    emulator ends in ``Storage.create_file``, so one check there, under the same lock as the write, is atomic by
    construction; a proxy would have to parse multipart bodies and resumable sessions and re-read the object's
    generation over HTTP, with a window between the check and the write. The subclasses belong to this server
    only (no module-level patching), so an emulator with ``enforce_preconditions = False`` is the unmodified one.

    Only ``ifGenerationMatch`` (``0`` = must not exist, ``N`` = current generation must be ``N``) is enforced;
    other preconditions are ignored as the emulator always did. The emulator serves one request at a time.

    Attributes:
        enforce_preconditions: set to False to see the emulator's own behaviour (it overwrites).
        uploads: completed object writes by kind (``"simple"`` / ``"resumable"``), to prove which path ran.
    """

    def __init__(self) -> None:
        self.enforce_preconditions = True
        self.lock = threading.Lock()
        self.uploads: Counter[str] = Counter()
        self._context = threading.local()
        _install_log_filter()
        self.storage: Any = _make_storage_class()(self)
        self._handler = partial(_make_handler_class(), self)
        self._httpd: HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port = 0

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def start(self) -> None:
        if self._httpd is not None:
            return
        httpd = HTTPServer(("127.0.0.1", self._port), self._handler)
        self._port = httpd.server_address[1]
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="gcs-emulator", daemon=True
        )
        self._thread.start()
        self._httpd = httpd

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wipe(self) -> None:
        """Forget every bucket, object and upload session."""
        with self.lock:
            self.storage.wipe()
            self.storage.pending_preconditions.clear()
            self.uploads.clear()

    def create_bucket(self, bucket: str) -> None:
        from gcp_storage_emulator.handlers.buckets import create_bucket

        with self.lock:
            create_bucket(bucket, self.storage)

    def _cancel_upload(self, upload_id: str) -> None:
        from gcp_storage_emulator.exceptions import NotFound

        with self.lock:
            self.storage.pending_preconditions.pop(upload_id, None)
            with contextlib.suppress(NotFound, FileNotFoundError, KeyError):
                self.storage.delete_resumable_file_obj(upload_id)

    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint, "token": "anon", "project": "test"}

    def location(self, bucket: str, prefix: str = "store") -> StoreLocation:
        return StoreLocation("gcs", f"gs://{bucket}/{prefix}", self.storage_options(), self.endpoint)


def wait_until_refused(endpoint: str) -> None:
    """Raise unless nothing listens at ``endpoint`` any more (a check for stop())."""
    try:
        _request("GET", endpoint + "/", timeout=2)
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{endpoint} still answers ({exc.code})") from exc
    except OSError:
        return
    raise AssertionError(f"{endpoint} still answers")
