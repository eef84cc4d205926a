"""The verbs of the ``fracstore`` command: one function per verb, each a thin layer over one :class:`Store` method
(or ``bundle``, ``cache``, ``remotes``, ``demo``), and the argparse parser that reaches them.

Every verb returns an exit code (see :mod:`fracstore.cli`); errors travel as exceptions to ``main()``, which maps
them. Data goes to stdout (``--json`` for scripts), messages to stderr (silenced by ``-q``).

Verbs whose library API is not part of this installation (push/pull, export/import, verify, gc, cache, demo are
built alongside the core) are left out of the parser rather than registered as stubs: ``fracstore --help`` lists
exactly what works.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..config import default_cache_dir, default_store_url
from ..errors import ConfigError, FormatError, NotFoundError
from ..query import MetricFilter, ModelRecord, Ref, infer_mode
from ..remotes import Remote, add_remote, check_remote_name, get_remote, load_remotes, redacted_options, remove_remote
from ..store import Store
from .render import (
    format_number,
    format_size,
    format_when,
    parse_duration,
    parse_size,
    plain,
    record_json,
    table,
    tags_cell,
    to_json,
    utc_now,
)

Handler = Callable[["Context", argparse.Namespace], int]


class UsageError(Exception):
    """A command line that cannot be carried out as written (exit 2), found after argparse accepted it."""


# -- context -----------------------------------------------------------------------------------------------------


@dataclass
class Context:
    """What every verb needs: the parsed global options, output streams and the clock."""

    args: argparse.Namespace
    now: datetime = field(default_factory=utc_now)

    @property
    def quiet(self) -> bool:
        return bool(getattr(self.args, "quiet", False))

    @property
    def progress(self) -> bool:
        """Progress bars only for a person watching: not with -q, not when stderr is a file or pipe."""
        return not self.quiet and sys.stderr.isatty()

    def say(self, message: str) -> None:
        """A message for a person (stderr, silenced by -q)."""
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def out(self, text: str) -> None:
        """Data (stdout)."""
        if text:
            print(text, flush=True)

    def emit_json(self, value: Any) -> None:
        print(to_json(value), flush=True)

    def open_store(self, target: str | None = None, *, create: bool = False) -> Store:
        """Open ``target`` (a store URL or a remote name; default: ``--store``, ``$FRACSTORE_STORE``, the default
        local store). Reading verbs pass ``create=False`` so a mistyped path is an error, never a new store."""
        url, options = resolve_store(target if target is not None else self.store_text)
        kwargs: dict[str, Any] = {"storage_options": options or None, "create": create}
        if getattr(self.args, "cache_dir", None):
            kwargs["cache_dir"] = self.args.cache_dir
        if getattr(self.args, "offline", False):
            kwargs["offline"] = True
        return Store.open(url, **kwargs)

    @property
    def store_text(self) -> str:
        return getattr(self.args, "store", None) or default_store_url()

    def cache_dir(self) -> Path:
        explicit = getattr(self.args, "cache_dir", None)
        return Path(explicit) if explicit else default_cache_dir()


def resolve_store(text: str) -> tuple[str, dict[str, Any]]:
    """A store URL and its storage options for what the user typed: a remote name (from ``remote add``) wins over
    a local folder of the same name; write ``./name`` for the folder."""
    remote = get_remote(text)
    if remote is not None:
        return remote.url, dict(remote.storage_options)
    return text, {}


# -- argument types (argparse turns their errors into exit 2) ------------------------------------------------


def _ref(text: str) -> str:
    try:
        Ref.parse(text)
    except FormatError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _where(text: str) -> MetricFilter:
    try:
        return MetricFilter.parse(text)
    except FormatError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _metric(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    try:
        if not sep or not key:
            raise ValueError
        return key.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid metric {text!r}: write NAME=NUMBER, e.g. val_loss=0.012") from None


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"invalid {text!r}: write KEY=VALUE")
    return key, value


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except FormatError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration(text: str) -> Any:
    try:
        return parse_duration(text)
    except FormatError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
        if value < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1, not {text!r}") from None
    return value


def _remote_name(text: str) -> str:
    try:
        return check_remote_name(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _json_value(text: str) -> Any:
    """An option value as JSON when it parses (numbers, true/false, objects), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _read_json_arg(text: str, *, what: str) -> Any:
    """``--config`` and friends: inline JSON, or ``@path`` for a JSON file."""
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise NotFoundError(f"{what} file {path} does not exist", what=str(path)) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} is not valid JSON ({exc}); give inline JSON or @FILE") from None


def _api(store: Store, method: str) -> Callable[..., Any]:
    """A Store method that only some installations have (push, pull, verify, gc): the verb that calls it is
    registered only when it exists (see :func:`available_apis`), so looking it up by name keeps type checking
    independent of which parts are installed."""
    found: Callable[..., Any] = getattr(store, method)
    return found


# -- store ---------------------------------------------------------------------------------------------------


def cmd_init(ctx: Context, args: argparse.Namespace) -> int:
    try:
        store = ctx.open_store(create=False)
        created = False
    except NotFoundError:
        store = ctx.open_store(create=True)
        created = True
    if args.json:
        ctx.emit_json({"url": store.url, "id": store.id, "created": created})
        return 0
    ctx.say(f"{'created' if created else 'already a store:'} {store.url}")
    ctx.out(f"{store.url}  {store.id}")
    return 0


def cmd_save(ctx: Context, args: argparse.Namespace) -> int:
    from ..interop import HF_CONFIG, HF_INDEX, HF_WEIGHTS, read_weights  # noqa: PLC0415 (only save needs it)

    source = Path(args.path)
    weights = read_weights(source)
    if args.config is not None and args.config_file is not None:
        raise UsageError("give --config or --config-file, not both")
    if args.config_file is not None:
        config = _read_json_arg("@" + args.config_file, what="--config-file")
    elif args.config is not None:
        config = _read_json_arg(args.config, what="--config")
    else:
        config = weights.config or {}
    if not isinstance(config, dict):
        raise UsageError(f"the config must be a JSON object, not {type(config).__name__}")
    files: dict[str, bytes | os.PathLike[str]] = {}
    if weights.kind == "hf-folder":
        # The folder's other files (tokenizer.json, README.md, ...) travel with the weights; `get` writes them back.
        skip = {HF_CONFIG, HF_INDEX, HF_WEIGHTS}
        for child in sorted(source.iterdir()):
            is_shard = child.name.startswith("model-") and child.name.endswith(".safetensors")
            hidden = child.name.startswith(".")
            if child.is_file() and not child.is_symlink() and not hidden and not is_shard and child.name not in skip:
                files[child.name] = child
    for rel, local in args.file or ():
        files[rel] = Path(local)
    history = None if args.history is None else _read_json_arg("@" + args.history, what="--history")
    training = None if args.training is None else _read_json_arg(args.training, what="--training")
    store = ctx.open_store(create=True)
    saved = store.save(
        weights.state_dict,
        name=args.name,
        model_type=args.type,
        config=config,
        metrics=dict(args.metric or ()),
        history=history,
        tags=args.tag or (),
        description=args.description or "",
        training=training,
        parent=args.parent,
        files=files or None,
    )
    if args.json:
        ctx.emit_json(
            {
                "ref": saved.ref,
                "name": saved.name,
                "version": saved.version,
                "digest": str(saved.digest),
                "source_format": weights.kind,
                "bytes_total": saved.bytes_total,
                "bytes_written": saved.bytes_written,
                "blobs_total": saved.blobs_total,
                "blobs_written": saved.blobs_written,
            }
        )
        return 0
    ctx.say(
        f"saved {saved.ref} from {weights.kind} {source} to {store.url}: wrote {format_size(saved.bytes_written)} "
        f"of {format_size(saved.bytes_total)} ({saved.blobs_written} of {saved.blobs_total} blobs new)"
    )
    ctx.out(f"{saved.ref}  {saved.digest}")
    return 0


# -- find ------------------------------------------------------------------------------------------------------


def _metric_columns(records: Sequence[ModelRecord], first: Sequence[str], limit: int = 4) -> list[str]:
    counts = Counter(m for r in records for m in r.metrics)
    chosen = list(dict.fromkeys(first))
    for metric, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(chosen) >= limit:
            break
        if metric not in chosen:
            chosen.append(metric)
    return chosen


def _record_rows(ctx: Context, records: Sequence[ModelRecord], metrics: Sequence[str]) -> str:
    headers = ["REF", "TYPE", "SIZE", "CREATED", "TAGS", *(m.upper() for m in metrics), "DIGEST"]
    rows = [
        [
            r.ref,
            r.model_type or "-",
            format_size(r.size),
            format_when(r.created_at, now=ctx.now, age_only=True),
            tags_cell(r),
            *(format_number(r.metric(m)) for m in metrics),
            r.digest.short,
        ]
        for r in records
    ]
    right = [False, False, True, False, False, *([True] * len(metrics)), False]
    return table(headers, rows, right=right)


def cmd_ls(ctx: Context, args: argparse.Namespace) -> int:
    store = ctx.open_store()
    found = store.list(
        args.name, model_type=args.type, tags=args.tag or (), where=args.where or (), latest_only=args.latest
    )
    records = list(found)
    if args.sort:
        mode = args.mode or infer_mode(args.sort)
        sign = 1.0 if mode == "min" else -1.0
        present = [r for r in records if r.metric(args.sort) is not None]
        # Best first; ties newest first; versions without the metric last, in publish order.
        present.sort(key=lambda r: (sign * (r.metric(args.sort) or 0.0), -r.seq))
        records = present + [r for r in records if r.metric(args.sort) is None]
    if args.limit:
        records = records[: args.limit]
    if args.json:
        ctx.emit_json([record_json(r) for r in records])
        return 0
    if not records:
        ctx.say(f"no models match in {store.url}")
        return 0
    first = [args.sort] if args.sort else []
    first += [f.metric for f in args.where or ()]
    ctx.out(_record_rows(ctx, records, _metric_columns(records, first)))
    return 0


def cmd_show(ctx: Context, args: argparse.Namespace) -> int:
    store = ctx.open_store()
    info = store.info(args.ref)
    record, manifest = info.record, info.manifest
    history = store.history(args.ref) if args.history else None
    if args.json:
        data = record_json(record)
        data.update(
            {
                "config": plain(manifest.config),
                "environment": dict(manifest.environment),
                "files": [
                    {"path": f.path, "digest": str(f.blob), "size": f.size, "media_type": f.media_type}
                    for f in manifest.files
                ],
                "tensors": [
                    {
                        "name": t.name,
                        "dtype": t.dtype,
                        "shape": list(t.shape),
                        "size": t.size,
                        "digest": str(t.digest),
                        "blob": str(t.blob),
                        "alias": t.alias,
                    }
                    for t in manifest.tensors
                ],
                "has_history": manifest.history is not None,
            }
        )
        if args.history:
            data["history"] = plain(history)
        ctx.emit_json(data)
        return 0
    lines = [
        ("ref", record.ref),
        ("digest", str(record.digest)),
        ("type", record.model_type or "-"),
        ("created", format_when(record.created_at, now=ctx.now)),
        ("published", format_when(record.published_at, now=ctx.now)),
        ("description", record.description or "-"),
        ("tags", " ".join(record.labels) or "-"),
        ("aliases", " ".join(f"{record.name}:{t}" for t in record.tags) or "-"),
        ("parent", str(record.parent) if record.parent else "-"),
        ("size", f"{format_size(record.size)} in {record.tensor_count} tensors"),
    ]
    lines += [(f"metric {k}", format_number(v)) for k, v in sorted(record.metrics.items())]
    lines += [(f"training {k}", str(v)) for k, v in record.training.as_dict().items()]
    if manifest.config:
        lines.append(("config", json.dumps(plain(manifest.config), sort_keys=True)))
    lines += [(f"env {k}", v) for k, v in sorted(manifest.environment.items()) if v]
    lines += [(f"file {f.path}", f"{format_size(f.size)} {f.media_type}") for f in manifest.files]
    width = max(len(k) for k, _ in lines)
    out = [f"{k.ljust(width)}  {v}" for k, v in lines]
    if args.tensors:
        rows = [
            [t.name, t.dtype, "x".join(map(str, t.shape)) or "scalar", format_size(t.size), t.alias or ""]
            for t in manifest.tensors
        ]
        out += [
            "",
            table(["TENSOR", "DTYPE", "SHAPE", "SIZE", "ALIAS OF"], rows, right=[False, False, False, True, False]),
        ]
    if args.history:
        out += ["", "history:", json.dumps(plain(history), indent=2)]
    ctx.out("\n".join(out))
    return 0


def cmd_log(ctx: Context, args: argparse.Namespace) -> int:
    store = ctx.open_store()
    entries = store.log(args.name)
    published: Counter[str] = Counter()
    rows: list[dict[str, Any]] = []
    for entry in entries:
        version = entry.version
        if entry.op == "publish" and entry.name is not None:
            published[entry.name] += 1
            version = published[entry.name]
        rows.append(
            {
                "seq": entry.seq,
                "op": entry.op,
                "time": entry.time,
                "name": entry.name,
                "version": version,
                "tag": entry.tag,
                "manifest": None if entry.manifest is None else str(entry.manifest),
                "writer": {"host": entry.writer.host, "pid": entry.writer.pid},
            }
        )
    if args.limit:
        rows = rows[-args.limit :]
    if args.json:
        ctx.emit_json(rows)
        return 0
    if not rows:
        ctx.say(f"the log of {store.url} has no entries{' for ' + args.name if args.name else ''}")
        return 0
    table_rows = [
        [str(r["seq"]), format_when(r["time"], now=ctx.now), r["op"], _log_subject(r), r["writer"]["host"]]
        for r in rows
    ]
    ctx.out(table(["SEQ", "TIME", "OP", "WHAT", "HOST"], table_rows, right=[True, False, False, False, False]))
    return 0


def _log_subject(row: dict[str, Any]) -> str:
    name, version, op = row["name"], row["version"], row["op"]
    if op == "publish":
        return f"{name}@{version}  {row['manifest'][:19]}"
    if op == "tag":
        return f"{name}:{row['tag']} -> {name}@{version}"
    if op == "untag":
        return f"{name}:{row['tag']}"
    if op == "delete":
        return f"{name}@{version}" if version is not None else f"{name} (every version)"
    return "-"


def cmd_best(ctx: Context, args: argparse.Namespace) -> int:
    store = ctx.open_store()
    found = store.best(
        args.metric, mode=args.mode, name=args.name, model_type=args.type, tags=args.tag or (), where=args.where or ()
    )
    if found is None:
        raise NotFoundError(
            f"no live model in {store.url} matching the filters has the metric {args.metric!r}", what=args.metric
        )
    value = found.metric(args.metric)
    mode = args.mode or infer_mode(args.metric)
    if args.json:
        data = record_json(found)
        data["best"] = {"metric": args.metric, "mode": mode, "value": value}
        ctx.emit_json(data)
        return 0
    ctx.say(f"best by {args.metric} ({'lowest' if mode == 'min' else 'highest'} wins) in {store.url}")
    ctx.out(f"{found.ref}  {args.metric}={format_number(value)}  {found.digest.short}")
    return 0


def cmd_compare(ctx: Context, args: argparse.Namespace) -> int:
    store = ctx.open_store()
    records = [store.resolve(ref) for ref in args.refs]
    metrics = list(dict.fromkeys(m for r in records for m in sorted(r.metrics)))
    summary_fields = ("training_duration", "final_loss", "best_loss", "best_val_loss", "epochs")
    metrics += [m for m in summary_fields if m not in metrics and any(r.metric(m) is not None for r in records)]
    values = {m: [r.metric(m) for r in records] for m in metrics}
    best: dict[str, str | None] = {}
    for metric, row in values.items():
        present = [(v, i) for i, v in enumerate(row) if v is not None]
        if not present:
            best[metric] = None
            continue
        pick = min(present) if infer_mode(metric) == "min" else max(present, key=lambda p: (p[0], -p[1]))
        best[metric] = records[pick[1]].ref
    if args.json:
        ctx.emit_json(
            {
                "models": [r.ref for r in records],
                "digests": [str(r.digest) for r in records],
                "metrics": values,
                "best": best,
            }
        )
        return 0
    rows = [
        [m, *(format_number(v) + ("*" if best[m] == r.ref else " ") for v, r in zip(row, records, strict=True))]
        for m, row in values.items()
    ]
    rows.insert(0, ["size", *(format_size(r.size) + " " for r in records)])
    rows.insert(0, ["type", *((r.model_type or "-") + " " for r in records)])
    ctx.out(table(["METRIC", *(r.ref for r in records)], rows, right=[False, *([True] * len(records))]))
    ctx.say("* best value (lowest for losses, errors and durations; highest otherwise)")
    return 0


def cmd_diff(ctx: Context, args: argparse.Namespace) -> int:
    store = ctx.open_store()
    diff = store.diff(args.a, args.b)
    if args.json:
        ctx.emit_json(
            {
                "a": diff.a,
                "b": diff.b,
                "changed": list(diff.changed),
                "added": list(diff.added),
                "removed": list(diff.removed),
                "unchanged": list(diff.unchanged),
                "bytes_shared": diff.bytes_shared,
                "bytes_new": diff.bytes_new,
                "metrics": {m: list(pair) for m, pair in diff.metrics.items()},
            }
        )
        return 0
    total = diff.bytes_shared + diff.bytes_new
    shared_pct = f" ({100 * diff.bytes_shared / total:.0f}%)" if total else ""
    out = [
        f"{diff.a} -> {diff.b}",
        f"tensors: {len(diff.changed)} changed, {len(diff.added)} added, {len(diff.removed)} removed, "
        f"{len(diff.unchanged)} unchanged",
        f"bytes:   {format_size(diff.bytes_shared)} shared{shared_pct}, {format_size(diff.bytes_new)} new in {diff.b}",
    ]
    for mark, names in (("~", diff.changed), ("+", diff.added), ("-", diff.removed)):
        out += [f"  {mark} {n}" for n in names]
    if diff.metrics:
        rows = [[m, format_number(a), format_number(b)] for m, (a, b) in diff.metrics.items()]
        out += ["", table(["METRIC", diff.a, diff.b], rows, right=[False, True, True])]
    ctx.out("\n".join(out))
    return 0


# -- change -----------------------------------------------------------------------------------------------------


def cmd_tag(ctx: Context, args: argparse.Namespace) -> int:
    store = ctx.open_store()
    kwargs: dict[str, Any] = {}
    if args.expect is not None:
        if args.expect == "none":
            kwargs["expected"] = None
        elif args.expect.isdigit() and int(args.expect) > 0:
            kwargs["expected"] = int(args.expect)
        else:
            raise UsageError(f"--expect takes a version number or 'none', not {args.expect!r}")
    record = store.tag(args.ref, args.tag, **kwargs)
    if args.json:
        ctx.emit_json(record_json(record))
        return 0
    ctx.out(f"{record.name}:{args.tag} -> {record.ref}")
    return 0


def cmd_untag(ctx: Context, args: argparse.Namespace) -> int:
    store = ctx.open_store()
    store.untag(args.name, args.tag)
    ctx.say(f"removed tag {args.name}:{args.tag}")
    return 0


def cmd_rm(ctx: Context, args: argparse.Namespace) -> int:
    store = ctx.open_store()
    deleted = store.delete(args.ref, all_versions=args.all)
    if args.json:
        ctx.emit_json({"deleted": deleted})
        return 0
    ctx.say(f"deleted {len(deleted)} version(s) from {store.url}; blobs stay until gc")
    ctx.out("\n".join(deleted))
    return 0


def cmd_get(ctx: Context, args: argparse.Namespace) -> int:
    from ..interop import write_hf_folder, write_safetensors  # noqa: PLC0415 (only get needs it)

    dest = Path(args.dest)
    fmt = args.format
    if fmt == "auto":
        fmt = "safetensors" if dest.suffix.lower() == ".safetensors" else "hf"
    if args.max_shard_size is not None and fmt != "hf":
        raise UsageError("--max-shard-size applies to --format hf only")
    if dest.exists() and not args.force and (dest.is_file() or any(dest.iterdir())):
        raise ConfigError(f"{dest} exists{'' if dest.is_file() else ' and is not empty'}; pass --force to replace")
    store = ctx.open_store()
    record = store.resolve(args.ref)
    ref = record.ref  # pin the version: a concurrent save must not change what this command writes
    weights = store.load(ref)
    if fmt == "safetensors":
        metadata = {"fracstore_ref": ref, "fracstore_digest": str(record.digest)}
        write_safetensors(weights, dest, metadata=metadata, overwrite=args.force)
        written = [dest]
    else:
        manifest = store.manifest(record.digest)
        files = {f.path: store.read_file(ref, f.path) for f in manifest.files}
        written = write_hf_folder(
            weights,
            dest,
            config=dict(record.config),
            max_shard_bytes=args.max_shard_size,
            files=files,
            overwrite=args.force,
        )
    size = sum(p.stat().st_size for p in written)
    if args.json:
        ctx.emit_json(
            {"ref": ref, "digest": str(record.digest), "format": fmt, "files": [str(p) for p in written], "bytes": size}
        )
        return 0
    ctx.say(f"wrote {ref} as {fmt} to {dest} ({len(written)} file(s), {format_size(size)})")
    ctx.out(str(dest))
    return 0


# -- between stores ---------------------------------------------------------------------------------------------


def _transfer_json(summary: Any) -> dict[str, Any]:
    return {
        "source": summary.source,
        "destination": summary.destination,
        "versions": [
            {
                "name": v.name,
                "source_version": v.source_version,
                "destination_version": v.destination_version,
                "digest": str(v.digest),
                "published": v.published,
            }
            for v in summary.versions
        ],
        "blobs_total": summary.blobs_total,
        "blobs_sent": summary.blobs_sent,
        "bytes_total": summary.bytes_total,
        "bytes_sent": summary.bytes_sent,
    }


def _report_transfer(ctx: Context, args: argparse.Namespace, summary: Any) -> int:
    if args.json:
        ctx.emit_json(_transfer_json(summary))
        return 0
    for v in summary.versions:
        state = "published" if v.published else "already there"
        ctx.out(f"{v.name}@{v.source_version} -> {v.name}@{v.destination_version}  {state}  {v.digest.short}")
    ctx.say(
        f"{summary.source} -> {summary.destination}: sent {summary.blobs_sent} of {summary.blobs_total} blobs, "
        f"{format_size(summary.bytes_sent)} of {format_size(summary.bytes_total)}"
    )
    return 0


def cmd_push(ctx: Context, args: argparse.Namespace) -> int:
    source = ctx.open_store()
    destination = ctx.open_store(args.destination, create=True)  # pushing to a new prefix makes the store there
    summary = _api(source, "push")(destination, args.ref, all_versions=args.all, tags=args.tags, progress=ctx.progress)
    return _report_transfer(ctx, args, summary)


def cmd_pull(ctx: Context, args: argparse.Namespace) -> int:
    source = ctx.open_store(args.source)
    destination = ctx.open_store(create=True)
    summary = _api(destination, "pull")(source, args.ref, all_versions=args.all, tags=args.tags, progress=ctx.progress)
    return _report_transfer(ctx, args, summary)


def cmd_export(ctx: Context, args: argparse.Namespace) -> int:
    bundle = importlib.import_module("fracstore.bundle")
    store = ctx.open_store()
    output = Path(args.output)
    if output.exists() and not args.force:
        raise UsageError(f"{output} exists; pass --force to replace it")
    summary = bundle.export_bundle(store, list(args.refs), output, all_versions=args.all)
    models = [
        {
            "ref": f"{m.name}@{m.version}",
            "name": m.name,
            "version": m.version,
            "digest": str(m.digest),
            "tags": list(m.tags),
        }
        for m in summary.models
    ]
    if args.json:
        ctx.emit_json(
            {
                "path": str(summary.path),
                "models": models,
                "blob_count": summary.blob_count,
                "total_bytes": summary.total_bytes,
                "file_size": summary.file_size,
            }
        )
        return 0
    ctx.say(
        f"exported {len(models)} version(s), {summary.blob_count} blobs ({format_size(summary.total_bytes)}) from "
        f"{store.url} to {summary.path} ({format_size(summary.file_size)})"
    )
    ctx.out("\n".join(f"{m['ref']}  {m['digest'][:19]}" for m in models))
    return 0


def cmd_import(ctx: Context, args: argparse.Namespace) -> int:
    bundle = importlib.import_module("fracstore.bundle")
    path = Path(args.path)
    if not path.is_file():
        raise NotFoundError(f"no bundle file at {path}", what=str(path))
    store = ctx.open_store(create=True)
    summary = bundle.import_bundle(store, path, tags=not args.no_tags)
    records: list[ModelRecord] = list(summary.models)
    published = set(summary.published)
    if args.json:
        ctx.emit_json(
            {
                "path": str(summary.path),
                "models": [record_json(r) for r in records],
                "published": list(summary.published),
                "blobs_written": summary.blobs_written,
                "blobs_present": summary.blobs_present,
                "bytes_written": summary.bytes_written,
                "bytes_total": summary.bytes_total,
            }
        )
        return 0
    ctx.say(
        f"imported {len(records)} version(s) from {path} into {store.url} ({len(published)} newly published): wrote "
        f"{format_size(summary.bytes_written)} of {format_size(summary.bytes_total)}"
    )
    ctx.out(
        "\n".join(
            f"{r.ref}  {r.digest.short}  {'published' if r.ref in published else 'already there'}" for r in records
        )
    )
    return 0


# -- maintenance ------------------------------------------------------------------------------------------------

EXIT_INTEGRITY = 3


def cmd_verify(ctx: Context, args: argparse.Namespace) -> int:
    store = ctx.open_store()
    report = _api(store, "verify")(read_data=args.read_data)
    problems = [{"kind": p.kind, "subject": str(p.subject), "message": p.message} for p in report.problems]
    if args.json:
        ctx.emit_json(
            {
                "store": report.store,
                "read_data": report.read_data,
                "entries_checked": report.entries_checked,
                "versions_checked": report.versions_checked,
                "blobs_checked": report.blobs_checked,
                "bytes_checked": report.bytes_checked,
                "unreferenced_blobs": report.unreferenced_blobs,
                "problems": problems,
            }
        )
    else:
        if problems:
            rows = [[p["kind"], p["subject"], p["message"]] for p in problems]
            ctx.out(table(["KIND", "SUBJECT", "PROBLEM"], rows))
        verdict = f"{len(problems)} problem(s)" if problems else "ok"
        how = "re-hashing every blob" if args.read_data else "checking sizes"
        unreferenced = (
            f", {report.unreferenced_blobs} unreferenced blob(s) (gc reclaims them)"
            if report.unreferenced_blobs > 0
            else ""
        )
        ctx.say(
            f"verified {report.store} ({how}): {report.entries_checked} log entries, {report.versions_checked} "
            f"versions, {report.blobs_checked} blobs ({format_size(report.bytes_checked)}){unreferenced}: {verdict}"
        )
    return EXIT_INTEGRITY if problems else 0


def cmd_gc(ctx: Context, args: argparse.Namespace) -> int:
    store = ctx.open_store()
    kwargs: dict[str, Any] = {"dry_run": args.dry_run}
    if args.grace is not None:
        kwargs["grace"] = args.grace
    report = _api(store, "gc")(**kwargs)
    data = plain(report)
    if args.json:
        ctx.emit_json(data)
        return 0
    ctx.say(f"gc of {store.url}{' (dry run: nothing deleted)' if args.dry_run else ''}")
    if isinstance(data, dict):
        ctx.out("\n".join(f"{k}: {_gc_value(k, v)}" for k, v in data.items()))
    else:
        ctx.out(str(data))
    return 0


def _gc_value(key: str, value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and "bytes" in key:
        return format_size(value)
    if isinstance(value, list):
        return f"{len(value)} item(s)" + "".join(f"\n  {json.dumps(v)}" for v in value)
    return str(value)


def cmd_cache_ls(ctx: Context, args: argparse.Namespace) -> int:
    cache = importlib.import_module("fracstore.cache").BlobCache(ctx.cache_dir())
    entries = sorted(cache.entries(), key=lambda e: e.last_used, reverse=True)
    total = cache.total_bytes()
    if args.json:
        ctx.emit_json(
            {
                "cache_dir": str(ctx.cache_dir()),
                "total_bytes": total,
                "entries": [
                    {"digest": str(e.digest), "size": e.size, "last_used": plain(e.last_used)} for e in entries
                ],
            }
        )
        return 0
    rows = [[str(e.digest), format_size(e.size), format_when(_utc_text(e.last_used), now=ctx.now)] for e in entries]
    if rows:
        ctx.out(table(["DIGEST", "SIZE", "LAST USED"], rows, right=[False, True, False]))
    ctx.say(f"{len(entries)} cached blob(s), {format_size(total)} in {ctx.cache_dir()}")
    return 0


def _utc_text(moment: datetime) -> str:
    from ..manifest import format_time  # noqa: PLC0415 (render formats manifest-style times)

    return format_time(moment if moment.tzinfo else moment.astimezone())


def cmd_cache_prune(ctx: Context, args: argparse.Namespace) -> int:
    cache = importlib.import_module("fracstore.cache").BlobCache(ctx.cache_dir())
    result = cache.prune(args.max_size, dry_run=args.dry_run)
    if args.json:
        ctx.emit_json(
            {
                "dry_run": args.dry_run,
                "removed": [{"digest": str(e.digest), "size": e.size} for e in result.removed],
                "bytes_freed": result.bytes_freed,
                "bytes_kept": result.bytes_kept,
            }
        )
        return 0
    ctx.out("\n".join(str(e.digest) for e in result.removed))
    verb = "would free" if args.dry_run else "freed"
    ctx.say(
        f"{verb} {format_size(result.bytes_freed)} ({len(result.removed)} blob(s)); "
        f"{format_size(result.bytes_kept)} kept in {ctx.cache_dir()}"
    )
    return 0


# -- remotes ------------------------------------------------------------------------------------------------------


def _remote_json(remote: Remote) -> dict[str, Any]:
    from ..backend import redact_url  # noqa: PLC0415 (the one place URLs are redacted)

    return {
        "name": remote.name,
        "url": redact_url(remote.url),
        "storage_options": redacted_options(remote.storage_options),
    }


def cmd_remote_add(ctx: Context, args: argparse.Namespace) -> int:
    options = {key: _json_value(value) for key, value in args.option or ()}
    # A local folder is stored absolute: a remote must name the same store from every working directory.
    url = args.url if "://" in args.url else os.path.abspath(args.url)
    remote = Remote(args.name, url, options)
    add_remote(remote, replace=args.replace)
    ctx.say(f"added remote {remote.name} -> {_remote_json(remote)['url']}")
    return 0


def cmd_remote_ls(ctx: Context, args: argparse.Namespace) -> int:
    remotes = [_remote_json(r) for _, r in sorted(load_remotes().items())]
    if args.json:
        ctx.emit_json(remotes)
        return 0
    rows = [[r["name"], r["url"], " ".join(f"{k}={v}" for k, v in r["storage_options"].items())] for r in remotes]
    if rows:
        ctx.out(table(["NAME", "URL", "OPTIONS"], rows))
    else:
        ctx.say("no remotes; add one with: fracstore remote add NAME URL")
    return 0


def cmd_remote_rm(ctx: Context, args: argparse.Namespace) -> int:
    removed = remove_remote(args.name)
    ctx.say(f"removed remote {removed.name}")
    return 0


# -- demo ---------------------------------------------------------------------------------------------------------


def cmd_demo(ctx: Context, args: argparse.Namespace) -> int:
    run_demo = importlib.import_module("fracstore.demo").run_demo
    # The demo's networks are tiny: a second intra-op thread only adds synchronisation, and on a busy 2-core machine
    # it made the demo several times slower. The command owns the process, so it may set this; the library does not.
    torch.set_num_threads(1)
    # The demo saves into the same store as every other verb, so `fracstore ls` afterwards shows what it made.
    second = None if args.second_store is None else resolve_store(args.second_store)[0]
    report = run_demo(
        store_url=resolve_store(ctx.store_text)[0],
        second_store_url=second,
        workdir=None if args.workdir is None else Path(args.workdir),
        say=lambda line: ctx.say(str(line)),
    )
    if args.json:
        ctx.emit_json(plain(report))
        return 0
    ctx.out(_demo_summary(report))
    return 0


def _demo_summary(report: Any) -> str:
    """The demo report as a short summary: what was saved, which won, how well it applies, what was shipped."""
    saved = [
        [v.ref, str(v.width), str(v.steps), format_number(v.val_error), format_size(v.bytes_written)]
        for v in report.saved
    ]
    lines = [
        f"store:        {report.store_url}",
        table(["SAVED", "WIDTH", "STEPS", "VAL_ERROR", "WRITTEN"], saved, right=[False, True, True, True, True]),
        f"best:         {report.best_ref} (val_error {format_number(report.best_val_error)}; scheme floor "
        f"{format_number(report.scheme_error)})",
        f"applied to:   {report.new_inputs} new inputs, max error {format_number(report.test_error)}",
        f"bundle:       {report.bundle_path} ({format_size(report.bundle_bytes)})",
        f"imported:     {', '.join(report.imported_refs)} into {report.second_store_url} (max prediction difference "
        f"{format_number(report.imported_difference)})",
        f"took:         {report.duration_s:.1f} s",
    ]
    return "\n".join(lines)


# -- the parser ---------------------------------------------------------------------------------------------------


def _store_has(method: str) -> bool:
    return callable(getattr(Store, method, None))


def _module_has(module: str, attr: str) -> bool:
    try:
        found = importlib.import_module(f"fracstore.{module}")
    except ImportError:
        return False
    return getattr(found, attr, None) is not None


def supports_offline() -> bool:
    """Whether this installation's Store.open takes ``offline=``."""
    return "offline" in inspect.signature(Store.open).parameters


def available_apis() -> dict[str, bool]:
    """Which guarded verbs this installation can offer, by the library API each needs."""
    return {
        "push": _store_has("push"),
        "pull": _store_has("pull"),
        "export": _module_has("bundle", "export_bundle"),
        "import": _module_has("bundle", "import_bundle"),
        "verify": _store_has("verify"),
        "gc": _store_has("gc"),
        "cache": _module_has("cache", "BlobCache"),
        "demo": _module_has("demo", "run_demo"),
    }


EXIT_CODES_EPILOG = """\
exit codes:
  0  ok
  1  error (storage, conflict, bad data, anything else)
  2  usage: a bad option, argument or ref
  3  integrity: stored bytes do not match their digest (or verify found problems)
  4  not found: no such store, model, version, tag, file or remote

environment: FRACSTORE_STORE (default store), FRACSTORE_CACHE_DIR, FRACSTORE_DEBUG=1 (tracebacks)
reference: docs/cli.md"""


def _common_options(*, suppress: bool) -> argparse.ArgumentParser:
    """Global options, accepted before or after the verb. Sub-parsers get ``SUPPRESS`` defaults so that an option
    given before the verb is not reset by the sub-parser's default."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("global options")
    group.add_argument(
        "--store",
        metavar="URL",
        default=default(None),
        help="store URL or remote name (default: $FRACSTORE_STORE, else the local default store)",
    )
    group.add_argument(
        "--cache-dir", metavar="DIR", default=default(None), help="local cache folder (default: $FRACSTORE_CACHE_DIR)"
    )
    if supports_offline():
        group.add_argument(
            "--offline", action="store_true", default=default(False), help="work from the local cache only"
        )
    group.add_argument("-q", "--quiet", action="store_true", default=default(False), help="no messages on stderr")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The ``fracstore`` argument parser, with exactly the verbs this installation supports."""
    parser = argparse.ArgumentParser(
        prog="fracstore",
        description="A content-addressed store for trained PyTorch models.",
        epilog=EXIT_CODES_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_common_options(suppress=False)],
    )
    parser.add_argument("--version", action="version", version=f"fracstore {__version__}")
    common = _common_options(suppress=True)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    apis = available_apis()

    def verb(name: str, handler: Handler, help_text: str, *, json_flag: bool = True, into: Any = verbs) -> Any:
        sub = into.add_parser(name, help=help_text, description=help_text, parents=[common])
        sub.set_defaults(handler=handler)
        if json_flag:
            sub.add_argument("--json", action="store_true", help="print JSON (keys: docs/cli.md)")
        return sub

    def filters(sub: Any) -> None:
        sub.add_argument("--name", help="only this model name")
        sub.add_argument("--type", metavar="TYPE", help="only this model type")
        sub.add_argument(
            "--tag", action="append", metavar="TAG", help="only versions with this label or registry tag (repeatable)"
        )
        sub.add_argument(
            "--where", action="append", type=_where, metavar="EXPR", help="metric threshold, e.g. 'val_loss<0.1'"
        )

    sub = verb("init", cmd_init, "create a store (no-op when one exists)")

    sub = verb("save", cmd_save, "save weights (.safetensors, HF folder, or legacy .pt/.pth) as a new version")
    sub.add_argument("path", help="a .safetensors file, an HF-style folder, or a legacy .pt/.pth/.bin state dict")
    sub.add_argument("--name", required=True, help="model name (letters, digits, . _ -)")
    sub.add_argument("--type", metavar="TYPE", help="model type (a registered type rebuilds the module on load)")
    sub.add_argument("--config", metavar="JSON", help="config as inline JSON, or @FILE (default: an HF config.json)")
    sub.add_argument("--config-file", metavar="FILE", help="config from a JSON file")
    sub.add_argument("--metric", action="append", type=_metric, metavar="K=V", help="a metric (repeatable)")
    sub.add_argument("--tag", action="append", metavar="TAG", help="a descriptive label (repeatable)")
    sub.add_argument("--description", metavar="TEXT", help="free text")
    sub.add_argument("--parent", type=_ref, metavar="REF", help="the model this one was fine-tuned from")
    sub.add_argument("--file", action="append", type=_key_value, metavar="REL=PATH", help="attach a file (repeatable)")
    sub.add_argument("--history", metavar="FILE", help="training history as a JSON file")
    sub.add_argument("--training", metavar="JSON", help="training summary, e.g. '{\"epochs\": 100}' or @FILE")

    sub = verb("ls", cmd_ls, "list live versions")
    filters(sub)
    sub.add_argument("--latest", action="store_true", help="only the newest version of each name")
    sub.add_argument("--sort", metavar="METRIC", help="best first by this metric (versions without it last)")
    sub.add_argument("--mode", choices=("min", "max"), help="for --sort: lower or higher is better (default: by name)")
    sub.add_argument("--limit", type=_positive, metavar="N", help="at most N rows")

    sub = verb("show", cmd_show, "show one version: metadata, metrics, config, environment, files")
    sub.add_argument("ref", type=_ref, help="NAME, NAME@VERSION, NAME:TAG or sha256:PREFIX")
    sub.add_argument("--tensors", action="store_true", help="also list the tensors")
    sub.add_argument("--history", action="store_true", help="also print the training history")

    sub = verb("log", cmd_log, "the registry log: publishes, tag moves, deletes")
    sub.add_argument("name", nargs="?", help="only entries about this model name")
    sub.add_argument("--limit", type=_positive, metavar="N", help="only the newest N entries")

    sub = verb("best", cmd_best, "the version with the best value of a metric")
    sub.add_argument("--metric", required=True, help="the metric (or training_duration, final_loss, best_val_loss)")
    sub.add_argument(
        "--mode",
        choices=("min", "max"),
        help="lower or higher wins (default: losses, errors, durations min; others max)",
    )
    filters(sub)

    sub = verb("compare", cmd_compare, "metrics of several versions side by side")
    sub.add_argument("refs", nargs="+", type=_ref, metavar="REF")

    sub = verb("diff", cmd_diff, "which tensors changed between two versions, and the bytes they share")
    sub.add_argument("a", type=_ref, metavar="REF_A")
    sub.add_argument("b", type=_ref, metavar="REF_B")

    sub = verb("tag", cmd_tag, "point a registry tag (NAME:TAG) at a version", json_flag=True)
    sub.add_argument("ref", type=_ref)
    sub.add_argument("tag")
    sub.add_argument("--expect", metavar="VERSION|none", help="compare-and-set: the version the tag points at now")

    sub = verb("untag", cmd_untag, "remove a registry tag", json_flag=False)
    sub.add_argument("name")
    sub.add_argument("tag")

    sub = verb("rm", cmd_rm, "delete a version (a tombstone; blobs stay until gc)")
    sub.add_argument("ref", type=_ref)
    sub.add_argument("--all", action="store_true", help="delete every version of the ref's name")

    sub = verb("get", cmd_get, "write a version's weights out as a .safetensors file or an HF-style folder")
    sub.add_argument("ref", type=_ref)
    sub.add_argument("dest", help="a .safetensors file path, or a folder")
    sub.add_argument(
        "--format",
        choices=("auto", "safetensors", "hf"),
        default="auto",
        help="auto: a file for a .safetensors DEST, else an HF folder",
    )
    sub.add_argument("--max-shard-size", type=_size, metavar="SIZE", help="HF folder: shard above SIZE (e.g. 5GB)")
    sub.add_argument("--force", action="store_true", help="replace an existing file / write into a non-empty folder")

    transfers = (
        ("push", cmd_push, "copy a version to another store (only the blobs it lacks)", "destination", "DEST"),
        ("pull", cmd_pull, "copy a version from another store into this one", "source", "SOURCE"),
    )
    for name, command, summary, other, metavar in transfers:
        if apis[name]:
            sub = verb(name, command, summary)
            sub.add_argument(other, metavar=metavar, help="store URL or remote name")
            sub.add_argument("ref", type=_ref)
            sub.add_argument("--all", action="store_true", help="every version of the name")
            sub.add_argument("--tags", action="store_true", help="also copy the registry tags")
    if apis["export"]:
        sub = verb("export", cmd_export, "write versions into one portable, verified bundle file")
        sub.add_argument("refs", nargs="+", type=_ref, metavar="REF")
        sub.add_argument("-o", "--output", required=True, metavar="PATH", help="the bundle file to write")
        sub.add_argument("--all", action="store_true", help="every version of each ref's name")
        sub.add_argument("--force", action="store_true", help="replace an existing file")
    if apis["import"]:
        sub = verb("import", cmd_import, "import a bundle file into the store")
        sub.add_argument("path", metavar="PATH")
        sub.add_argument("--no-tags", action="store_true", help="do not set the bundle's registry tags")
    if apis["verify"]:
        sub = verb("verify", cmd_verify, "check the store: log, manifests, blob sizes (exit 3 on problems)")
        sub.add_argument("--read-data", action="store_true", help="re-hash every blob (reads everything)")
    if apis["gc"]:
        sub = verb("gc", cmd_gc, "delete blobs no live version references (older than the grace period)")
        sub.add_argument("--grace", type=_duration, metavar="DURATION", help="e.g. 7d (the default), 12h, 0")
        sub.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    if apis["cache"]:
        cache = verbs.add_parser("cache", help="the local blob cache", description="the local blob cache")
        cache_verbs = cache.add_subparsers(dest="cache_verb", metavar="ACTION", required=True)
        verb("ls", cmd_cache_ls, "list cached blobs", into=cache_verbs)
        sub = verb("prune", cmd_cache_prune, "remove least recently used blobs", into=cache_verbs)
        sub.add_argument("--max-size", type=_size, required=True, metavar="SIZE", help="keep at most SIZE, e.g. 10GiB")
        sub.add_argument("--dry-run", action="store_true", help="list what would be removed")

    remote = verbs.add_parser("remote", help="named stores", description="named stores (in the user config folder)")
    remote_verbs = remote.add_subparsers(dest="remote_verb", metavar="ACTION", required=True)
    sub = verb("add", cmd_remote_add, "name a store URL", json_flag=False, into=remote_verbs)
    sub.add_argument("name", type=_remote_name)
    sub.add_argument("url")
    sub.add_argument(
        "-o", "--option", action="append", type=_key_value, metavar="KEY=VALUE", help="an fsspec storage option"
    )
    sub.add_argument("--replace", action="store_true", help="replace a remote of that name")
    verb("ls", cmd_remote_ls, "list remotes (secret-looking option values hidden)", into=remote_verbs)
    sub = verb("rm", cmd_remote_rm, "forget a remote", json_flag=False, into=remote_verbs)
    sub.add_argument("name")

    if apis["demo"]:
        sub = verb("demo", cmd_demo, "train, save, find, load and ship a small model in the store, narrating each step")
        sub.add_argument("--second-store", metavar="URL", help="where the bundle is imported (default: in --workdir)")
        sub.add_argument("--workdir", metavar="DIR", help="where the bundle goes (default: a new temporary folder)")
    return parser
