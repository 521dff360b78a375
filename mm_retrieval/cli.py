"""The ``mmr`` command line: a thin layer over :class:`mm_retrieval.pipeline.Pipeline`.

A command's result goes to stdout: one JSON document with ``--json``, else human-readable lines;
progress bars, warnings and logs go to stderr. Errors become one line on stderr and an exit code (2: bad input, 1: failure).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Callable

import click

from .errors import MMRError
from .training.encoder import DEFAULTS as ENCODER_TRAIN
from .training.reranker.config import DEFAULTS as RERANKER_TRAIN, OBJECTIVES as RERANKER_OBJECTIVES, PHRASE_DIM

log = logging.getLogger("mm_retrieval")


# What --rerank takes, everywhere (the pipeline picks the stage: mm_retrieval.pipeline.reranker_spec).
RERANKER_REF = ("a checkpoint dir from train-reranker, or a BLIP image-text retrieval model: a hub name such as "
                "Salesforce/blip-itm-base-coco (downloaded once; offline: a dir saved from one); NAME:REF picks reranker NAME "
                "(e.g. a plugin's)")


class _Device(click.ParamType):
    """``--device``: auto, cpu, cuda or cuda:N (whether that GPU exists is asked when a model loads)."""

    name = "device"

    def get_metavar(self, param: Any, ctx: Any = None) -> str:
        return "[auto|cpu|cuda[:N]]"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        from .devices import check_device
        from .errors import ConfigError

        try:
            return check_device(str(value), where="--device")
        except ConfigError as e:
            self.fail(str(e), param, ctx)


DEVICE = _Device()


def _echo(text: str = "") -> None:
    """Progress, warnings and errors: stderr, so that a command's result can be piped."""
    click.echo(text, err=True)


def _out(text: str = "") -> None:
    """A command's human-readable result: stdout (``mmr search ... | head`` gets the hits)."""
    click.echo(text)


def _emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, ensure_ascii=False))


def common_options(fn: Callable) -> Callable:
    """--db, --collection, --token, --model, --pretrained, --device, --config."""
    options = [
        click.option("--config", "config_file", type=click.Path(dir_okay=False), help="Pipeline TOML file; flags override it."),
        click.option("--db", help="Milvus URI: a file for embedded Milvus Lite (default ./mmr.db), http://host:19530, or a cloud URI."),
        click.option("--token", envvar="MMR_MILVUS_TOKEN", help="Milvus token (user:password or API key) [env MMR_MILVUS_TOKEN]."),
        click.option("--collection", help="Collection name (default: images)."),
        click.option("--model", help="open_clip architecture, hf-hub:org/repo, a model dir from train-encoder, or a config JSON. Default: the collection's model, else ViT-B-32."),
        click.option("--pretrained", help="Pretrained tag (e.g. laion2b_s34b_b79k), a local checkpoint file, or 'none'."),
        click.option("--device", type=DEVICE, help="Where models run (default: auto)."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def _pipeline(opts: dict[str, Any], **extra: Any):
    from .pipeline import Pipeline

    return Pipeline(
        opts.get("config_file"), db=opts.get("db"), collection=opts.get("collection"), token=opts.get("token"),
        model=opts.get("model"), pretrained=opts.get("pretrained"), device=opts.get("device"), **extra,
    )


def _pop_common(kwargs: dict[str, Any]) -> dict[str, Any]:
    keys = ("config_file", "db", "token", "collection", "model", "pretrained", "device")
    return {k: kwargs.pop(k) for k in keys}


def bulk_options(fn: Callable) -> Callable:
    """--bulk-import, --bulk-dir and the MinIO settings of `mmr index` (docs/scaling.md, "Scaling it out")."""
    options = [
        click.option("--bulk-import", is_flag=True, help="First load of a new or empty collection on a Milvus server through Milvus' bulk "
                     "import: Parquet files in the collection's schema, uploaded to MinIO/S3, imported in one job at the end "
                     "(pip install \"mm-retrieval[bulk]\")."),
        click.option("--bulk-dir", type=click.Path(file_okay=False), help="Bulk import without uploading: only write the Parquet files "
                     "into this folder and print the commands that import them (implies --bulk-import)."),
        click.option("--minio", "minio_endpoint", envvar="MMR_MINIO_ENDPOINT", default="http://localhost:9000", show_default=True,
                     help="The MinIO/S3 endpoint your Milvus server stores its data in [env MMR_MINIO_ENDPOINT]."),
        click.option("--minio-bucket", envvar="MMR_MINIO_BUCKET", default="a-bucket", show_default=True,
                     help="Milvus' bucket there (milvus.yaml minio.bucketName) [env MMR_MINIO_BUCKET]."),
        click.option("--minio-access-key", envvar="MMR_MINIO_ACCESS_KEY", default="minioadmin", show_default=True,
                     help="[env MMR_MINIO_ACCESS_KEY]"),
        click.option("--minio-secret-key", envvar="MMR_MINIO_SECRET_KEY", default="minioadmin",
                     help="[env MMR_MINIO_SECRET_KEY; default docker-compose.yml's]"),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def _pop_bulk(kwargs: dict[str, Any]) -> Any:
    """The BulkImport that `mmr index`'s bulk options ask for, or None."""
    on, local_dir = kwargs.pop("bulk_import"), kwargs.pop("bulk_dir")
    settings = {k: kwargs.pop(f"minio_{k}") for k in ("endpoint", "bucket", "access_key", "secret_key")}
    if not on and local_dir is None:
        return None
    from .stages.stores.milvus_bulk import BulkImport, BulkImportConfig

    return BulkImport(BulkImportConfig(local_dir=local_dir, **settings))


def video_options(fn: Callable) -> Callable:
    """--video-fps, --video-max-seconds, --video-max-segments (index and sync)."""
    options = [
        click.option("--video-fps", type=float, help="Video frames sampled per second (default 1; longer videos sparser, at most 240 frames)."),
        click.option("--video-max-seconds", type=float, help="Skip videos longer than this many seconds (default 10800)."),
        click.option("--video-max-segments", type=int, help="Most segments (moments) per video (default 48)."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def ray_options(fn: Callable) -> Callable:
    """--ray [ADDRESS] and --ray-actors (index and sync; docs/scaling.md, "Past one machine: Ray")."""
    options = [
        click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
                     help="Decode and encode on a pool of Ray actors (pip install \"mm-retrieval[ray]\"). Alone: a local Ray instance; "
                          "'auto', ray://HOST:10001 or HOST:6379: join that cluster (every node must see SOURCE's files). Writes still "
                          "go through this process only, which is how a Milvus Lite --db file works with it. Put --ray after SOURCE, "
                          "or write --ray=ADDRESS."),
        click.option("--ray-actors", type=int, help="Encoder actors with --ray, each loading the model once (default: one per GPU in the "
                                                     "cluster, one GPU each; without GPUs one per 4 CPUs, at least 1)."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def _pop_ray(kwargs: dict[str, Any], source: str | None) -> tuple[str | None, int | None]:
    """(--ray, --ray-actors); SOURCE is required, and when it is missing because ``--ray SOURCE``
    made SOURCE the address, the error says so."""
    ray_address, ray_actors = kwargs.pop("ray_address"), kwargs.pop("ray_actors")
    if source is None:
        took = f" (--ray took {ray_address!r} as its Ray address: put --ray after SOURCE, or write --ray=ADDRESS)" \
            if ray_address not in (None, "local") and os.path.exists(ray_address) else ""
        raise click.UsageError(f"Missing argument 'SOURCE'{took}.")
    return ray_address, ray_actors


def _pop_video(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"fps": kwargs.pop("video_fps"), "max_seconds": kwargs.pop("video_max_seconds"),
            "max_segments": kwargs.pop("video_max_segments")}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug), Milvus' and gRPC's own logs included.")
@click.version_option(package_name="mm-retrieval")
def cli(verbose: int) -> None:
    """mm_retrieval: text-to-image search with CLIP embeddings in Milvus and a cross-attention reranker.

    \b
    Typical use:
      mmr index ~/Pictures                     # embed and store a folder (or a .csv/.parquet/.jsonl table)
      mmr search "a dog on a beach" --k 5      # search it
      mmr plugins                              # every stage that can be used
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not verbose:
        # gRPC's C core logs to stderr on its own (e.g. "chttp2_transport ... GOAWAY ... too_many_pings");
        # read once, when grpc is first imported (by pymilvus, later). pymilvus' logger: quiet_milvus_logs.
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")


@cli.command()
@click.argument("source", type=click.Path(exists=False), required=False, metavar="SOURCE")  # required: index() says so
@common_options
@click.option("--batch-size", type=int, help="Images per forward pass (default 64).")
@click.option("--workers", type=int, help="Decoding processes (default 2).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--rerank", "rerank_path", type=click.Path(), help=f"Cache what this reranker reads for each image (its memory, or BLIP's vision tokens) rather than raw tokens; {RERANKER_REF}.")
@click.option("--text-columns", help="Comma-separated table columns whose text gets a text vector (default: caption).")
@click.option("--tokens", "token_fill", type=click.Choice(["eager", "lazy"]), default=None,
              help="When the reranker's image tokens are computed: eager (while indexing; the default, or the config's [index] tokens) "
              "or lazy (index at first-stage speed; the first rerank that meets an image computes and caches its tokens; "
              "needs a reranker with its own image side, e.g. BLIP).")
@click.option("--token-budget", help="With --tokens lazy: bound the token cache, as a size (20GB) or a number of images; "
              "the least recently used are evicted (and computed again when needed). Default: unbounded.")
@click.option("--no-tokens", is_flag=True, help="Cache no image tokens at all (rerank later after `mmr cache build`).")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: on a terminal).")
@click.option("--ocr/--no-ocr", default=None, help="Read the text in images (OCR, offline on CPU; needs `pip install \"mm-retrieval[ocr]\"`), "
              "also in images indexed before without it, for --mode ocr and as a caption where an image has none. Default: "
              "the config's [index] ocr, else off.")
@bulk_options
@ray_options
@video_options
def index(source: str, batch_size: int | None, workers: int | None, as_json: bool, rerank_path: str | None,
          text_columns: str | None, token_fill: str | None, token_budget: str | None, no_tokens: bool, progress: bool | None,
          ocr: bool | None, **kwargs: Any) -> None:
    """Embed and store SOURCE: a folder (recursive) or a table (.csv, .parquet, .jsonl).

    A table needs a 'path' column (absolute, or relative to the table); 'caption' and any other
    columns are kept as metadata you can --filter on. Re-running is safe: unchanged files are
    skipped, changed files replace their old entry, unreadable files are listed and skipped.
    Videos (.mp4, .mov, .mkv, .webm, .avi, .m4v) are indexed as moments (segments), in this
    process also with --ray; see --video-* for their bounds.
    """
    bulk = _pop_bulk(kwargs)
    ray_address, ray_actors = _pop_ray(kwargs, source)
    opts = _pop_common(kwargs)
    video = _pop_video(kwargs)
    pipe = _pipeline(opts, encoder={"batch_size": batch_size, "workers": workers}, reranker=rerank_path, cache_tokens=not no_tokens,
                     tokens=token_fill, token_budget=token_budget, video=video)
    columns = [c.strip() for c in text_columns.split(",") if c.strip()] if text_columns else None
    report = pipe.index(source, progress=progress, text_columns=columns, bulk_import=bulk, ray=ray_address, ray_actors=ray_actors,
                        ocr=ocr)
    if as_json:
        _emit_json({**report.to_dict(), **({"bulk_import": bulk.to_dict()} if bulk is not None else {})})
        return
    exists = pipe.store.exists()  # a run that found nothing to index creates no collection: names none
    _out(
        f"indexed {report.indexed}, unchanged {report.unchanged}, duplicates {report.duplicates}, "
        f"replaced {report.replaced}, moved {report.moved}, skipped {report.skipped} in {report.seconds:.1f}s"
        + (f" -> collection {pipe.store.name!r} ({pipe.store.count()} items)" if exists else "")
    )
    for f in report.failed[:50]:
        _out(f"  skipped {f.path}: {f.error}")
    if report.skipped > 50:
        _out(f"  ... and {report.skipped - 50} more (use --json for the full list)")
    _duplicate_lines(report)
    _ocr_lines(report)
    if bulk is not None and bulk.files:
        _out(f"bulk import: {bulk.rows} rows in {len(bulk.files)} Parquet file(s), {bulk.state}"
             + (f" (job {', '.join(bulk.job_ids)}: {bulk.imported_rows} rows)" if bulk.job_ids else f" under {bulk.folder}; import them with:"))
        if bulk.config.local_dir is not None:
            _out(bulk.command())
    if report.indexed == 0 and not exists:
        found = "no readable image" if report.skipped else "no image or text item"
        _echo(f"nothing to index: {found} in {source}, so no collection was created. A folder is searched recursively "
              "for image files (.jpg, .png, .webp, ...) and videos (.mp4, .mov, .webm, ...); a table needs rows with a 'path' (or, for text-only items, a caption).")


@cli.command()
@click.argument("source", type=click.Path(), required=False, metavar="SOURCE")  # required: _pop_ray says so
@common_options
@click.option("--dry-run", is_flag=True, help="Only show what would be added, replaced, moved and removed, which files are "
              "copies and which can't be read (each new or changed file is read and decoded, nothing is encoded or written).")
@click.option("--json", "as_json", is_flag=True, help="Print the report (or plan) as JSON on stdout.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: on a terminal).")
@click.option("--ocr/--no-ocr", default=None, help="Read the text in images (OCR, offline on CPU; needs `pip install \"mm-retrieval[ocr]\"`), "
              "also in images indexed before without it, for --mode ocr and as a caption where an image has none. Default: "
              "the config's [index] ocr, else off.")
@ray_options
@video_options
def sync(source: str, dry_run: bool, as_json: bool, progress: bool | None, ocr: bool | None, **kwargs: Any) -> None:
    """Bring the collection in step with SOURCE: add new files, replace changed ones, remove gone ones.

    Entries under SOURCE's folder (a table's folder, for a table) whose file is no longer listed
    are removed with their cached tokens; entries elsewhere are left alone. With --ray the new and
    changed images are decoded and encoded on Ray actors, as for `mmr index --ray`.
    """
    ray_address, ray_actors = _pop_ray(kwargs, source)
    video = _pop_video(kwargs)
    pipe = _pipeline(_pop_common(kwargs), video=video)
    report = pipe.sync(source, dry_run=dry_run, progress=progress, ray=ray_address, ray_actors=ray_actors, ocr=ocr)
    if as_json:
        _emit_json(report.to_dict())
        return
    if dry_run:  # each file read and decoded as the run would, so the plan is what the run will do
        plan = report.plan or {}
        _out(f"would add {len(plan['add'])}, replace {len(plan['replace'])} (content changed), move {len(plan['moved'])}, "
             f"remove {len(plan['remove'])}; {plan['unchanged']} unchanged, {len(plan['update'])} updated (time, caption or "
             f"metadata), {report.duplicates} duplicates, {report.skipped} unreadable")
        moved = [f"{m['from']} -> {m['path']}" for m in plan["moved"]]
        for items, label in ((plan["add"], "+"), (plan["replace"], "~"), (moved, ">"), (plan["remove"], "-")):
            for p in items[:20]:
                _out(f"  {label} {p}")
            if len(items) > 20:
                _out(f"  {label} ... and {len(items) - 20} more")
        for f in report.failed[:50]:
            _out(f"  ! {f.path}: {f.error}")
        _duplicate_lines(report)
        return
    _out(f"indexed {report.indexed}, replaced {report.replaced}, moved {report.moved}, removed {report.removed}, "
          f"unchanged {report.unchanged}, duplicates {report.duplicates}, skipped {report.skipped} in {report.seconds:.1f}s")
    for f in report.failed[:50]:
        _out(f"  skipped {f.path}: {f.error}")
    _duplicate_lines(report)
    _ocr_lines(report)


def _ocr_lines(report: Any) -> None:
    """With --ocr: how many images were read, and the files OCR failed on (indexed all the same)."""
    if report.ocr is None:
        return
    o = report.ocr
    _out(f"  ocr: read {o['read']} images ({o['with_text']} with text) in {o['seconds']:.1f}s"
         + (f", failed on {len(o['failed'])} (indexed without their text)" if o["failed"] else ""))
    for f in o["failed"][:20]:
        _out(f"  ocr failed {f['path']}: {f['error']}")


def _duplicate_lines(report: Any) -> None:
    """Which file is a copy of which (stored once: a search or rerank finds the first's item)."""
    for d in report.duplicate_files[:20]:
        _out(f"  duplicate {d.path}: listed twice" if d.path == d.of else f"  duplicate {d.path}: same content as {d.of}")
    if len(report.duplicate_files) > 20:
        _out(f"  ... and {len(report.duplicate_files) - 20} more duplicates (use --json for the full list)")


@cli.command()
@click.argument("folder", type=click.Path())
@common_options
@click.option("--debounce", type=float, default=2.0, show_default=True, metavar="SECONDS",
              help="Wait until the folder has been quiet this long before syncing (files still being copied keep changing).")
@click.option("--full-sync-every", "full_every", type=float, default=600.0, show_default=True, metavar="SECONDS",
              help="A full sync this often, for events the OS dropped.")
@video_options
def watch(folder: str, debounce: float, full_every: float, **kwargs: Any) -> None:
    """Keep the collection in step with FOLDER as files land, change, move and go (Ctrl-C stops).

    Starts with a full `mmr sync FOLDER`, then syncs the folders that file events touch, once they
    have been quiet for --debounce seconds, exactly as `mmr sync` would: one line per change on
    stderr. Killing it at any moment loses nothing: the next start's full sync catches up.
    Between syncs it lets go of the database, so `mmr search` in another shell works with Milvus
    Lite too (during a sync it is refused, saying so); `mmr serve --watch FOLDER` serves and
    watches in one process.
    """
    from .watch import FolderWatcher

    video = _pop_video(kwargs)
    pipe = _pipeline(_pop_common(kwargs), video=video)
    watcher = FolderWatcher(pipe, folder, debounce=debounce, max_delay=max(30.0, debounce), full_every=full_every, log=_echo,
                            release=True)  # Milvus Lite: other processes may search between syncs
    try:
        watcher.run()
    except KeyboardInterrupt:
        _echo("stopped")


@cli.command()
@click.argument("query", required=False)
@common_options
@click.option("--image", "image", help="Search by this image instead (a file or an http(s) URL): similar images, or with --mode text the captions that fit it.")
@click.option("--mode", type=click.Choice(["auto", "image", "text", "hybrid", "ocr"]),
              help="Search image vectors, text vectors, or both fused by Milvus. Default auto: a text query searches both (hybrid) "
                   "when the collection holds text vectors, else image vectors. Auto for an image query searches image vectors (similar images). "
                   "ocr: the words read in the images (a collection indexed with --ocr; also inside runs of letters the reader joined), "
                   "the whole phrase ranked first.")
@click.option("--k", type=int, help="Number of hits (default 10).")
@click.option("--candidates", type=int, help="First-stage candidates the reranker rescores (default 100).")
@click.option("--filter", "filter_", default="", help='Milvus filter expression, e.g. \'metadata["year"] >= 2020\'.')
@click.option("--rerank", "rerank_path", type=click.Path(), help=f"Rerank with this reranker ({RERANKER_REF}); an error where it can't apply (image queries, --mode text).")
@click.option("--no-rerank", is_flag=True, help="First stage only, even if the config names a reranker.")
@click.option("--json", "as_json", is_flag=True, help="Print results as one JSON document on stdout.")
@click.option("--group-by-video/--no-group-by-video", default=True,
              help="Keep each video's best moment only, so one long video can't fill the page (default: on).")
@click.option("--min-score", type=float, metavar="X",
              help="The hits are every one whose first-stage similarity is above X (Milvus range search, at most 1000) instead "
                   "of a fixed top k; --k then shows the first k of them (in --sort order). Thresholds are model-specific: see "
                   "'Choosing --min-score' in docs/collections.md.")
@click.option("--sort", "sort", metavar="FIELD", help="Order the hits by a metadata field instead of relevance: --sort taken "
              "(oldest first), --sort -taken (newest first); comma-separated for several; score, path and caption too.")
@click.option("--collapse-duplicates", is_flag=True, help="Show one hit per group of near-duplicates (re-saved, resized, cropped "
              "or turned copies of one photo, as `mmr duplicates` groups them): its best-ranked.")
@click.option("--server", "server_url", metavar="URL", help="Search through the `mmr serve` at URL (models loaded once, there). "
              "Default: the one serving the same --db and --collection, when running, unless --config, --model, --pretrained, "
              "--device or another --rerank is given.")
def search(query: str | None, image: str | None, mode: str | None, k: int | None, candidates: int | None, filter_: str,
           rerank_path: str | None, no_rerank: bool, as_json: bool, group_by_video: bool, min_score: float | None,
           sort: str | None, collapse_duplicates: bool, server_url: str | None, **kwargs: Any) -> None:
    """Search for QUERY (text), or for --image PATH_OR_URL.

    Text queries find images (and, in text/hybrid mode, items by their captions); the reranker
    (--rerank DIR, or the config's) rescores the candidates when the query is text and the
    candidates are images (image and hybrid modes). Image queries find similar images.
    """
    from .errors import InputError
    from .query import validate_query

    if (query is None) == (image is None):
        raise InputError("give a text QUERY or --image PATH_OR_URL (exactly one)")
    if query is not None:
        validate_query(query)  # fail before loading any model
    rerank = False if no_rerank else (True if rerank_path is not None else None)  # --rerank DIR asks for reranking
    opts = _pop_common(kwargs)
    server = _search_server(opts, server_url, rerank_path)
    if server is not None:  # a running `mmr serve` answers: no model loaded here
        from .config import SearchConfig
        from .server.discovery import remote_search

        defaults = SearchConfig()  # this command's defaults, not the server's config
        result = remote_search(server, query, image=image, mode=mode or defaults.mode,
                               k=(None if min_score is not None else defaults.k) if k is None else k,
                               candidates=defaults.candidates if candidates is None else candidates, filter=filter_, rerank=bool(rerank),
                               group_by_video=group_by_video, api_key=os.environ.get("MMR_API_KEY"), min_score=min_score, sort=sort,
                               collapse_duplicates=collapse_duplicates)
        hybrid_ranker = defaults.hybrid_ranker
    else:
        pipe = _pipeline(opts, reranker=rerank_path)
        result = pipe.search(query, image=image, mode=mode, k=k, candidates=candidates, filter=filter_, rerank=rerank,
                             group_by_video=group_by_video, min_score=min_score, sort=sort,
                             collapse_duplicates=collapse_duplicates)
        hybrid_ranker = pipe.config.search.hybrid_ranker
    if as_json:
        _emit_json(result.to_dict())
        return
    columns = _score_columns(result, hybrid_ranker, by_image=image is not None)
    stage = "reranked" if result.reranked else "first stage"
    _out(f"{len(result.hits)} hits for {result.query!r} ({result.mode} mode, {stage}, {result.timings_ms['total']:.0f} ms); "
         f"ordered by {sort if sort else columns[0][0]}" + (f", similarity above {min_score:g}" if min_score is not None else ""))
    _out("  " + "; ".join(f"{label}: {meaning}" for label, meaning, _ in columns))
    decimals = [_decimals([get(h) for h in result.hits]) for _, _, get in columns]
    widths = [max(9, d + 5) for d in decimals]
    _out("  #." + "".join(f"{label:>{w}}" for (label, _, _), w in zip(columns, widths)) + "  path / caption")
    for h in result.hits:
        scores = "".join(f"{_fmt_score(get(h), d):>{w}}" for (_, _, get), d, w in zip(columns, decimals, widths))
        cap = f"  \"{h.caption}\"" if h.caption else ""
        when = f" [{h.moment}]" if h.moment else ""  # a video's moment, as the page shows it
        if result.mode == "ocr":  # what was read, since that is what matched
            cap = f"  text: \"{((h.metadata or {}).get('ocr') or {}).get('text', '')[:100]}\""
        skipped = f"  (not reranked: {h.not_reranked})" if h.not_reranked else ""  # lazy tokens whose file is gone
        copies = f"  (+{h.near_duplicates} near-duplicates hidden)" if h.near_duplicates else ""  # --collapse-duplicates
        _out(f"{h.rank:3d}.{scores}  {h.path or '(text item)'}{when}{cap}{skipped}{copies}")


def _rerank_checkpoint(ref: str) -> str:
    """The checkpoint ``--rerank REF`` names (without a ``NAME:`` prefix), as a server advertises it."""
    from .pipeline import reranker_spec

    return str(reranker_spec(ref).params["checkpoint"])


def _search_server(opts: dict[str, Any], server_url: str | None, rerank_path: str | None, *,
                   verb: tuple[str, str] = ("searches", "searching")) -> str | None:
    """The `mmr serve` that answers a search (eval, explain: ``verb``) instead of this process:
    --server URL, else the one announced for the same database and collection
    (:mod:`mm_retrieval.server.discovery`) when the command names no config, model or device of
    its own, and no reranker but the server's."""
    from .server import discovery

    own = [flag for key, flag in (("config_file", "--config"), ("model", "--model"), ("pretrained", "--pretrained"),
                                  ("device", "--device")) if opts.get(key)]
    if server_url:
        if own:
            raise click.UsageError(f"--server {verb[0]} with the server's models and config; drop {', '.join(own)}")
        return server_url
    if own:
        return None
    from .config import DEFAULT_COLLECTION, DEFAULT_DB

    found = discovery.find_server(opts.get("db") or DEFAULT_DB, opts.get("collection") or DEFAULT_COLLECTION)
    if found is None:
        return None
    if rerank_path is not None and discovery.resolved_ref(_rerank_checkpoint(rerank_path)) != found.reranker:
        log.info("not %s through mmr serve at %s: it reranks with %s, not %s", verb[1], found.url, found.reranker, rerank_path)
        return None
    log.info("%s through mmr serve at %s (pid %s)", verb[1], found.url, found.pid)
    return found.url


def _score_columns(result: Any, hybrid_ranker: str, *, by_image: bool) -> list[tuple[str, str, Callable[[Any], float | None]]]:
    """(label, meaning, value) of each score a hit list shows; the first is the one it is ordered by."""
    query = "query image" if by_image else "query"
    image = ("image", f"cosine of the {query} and the image vectors", lambda h: h.retrieval_score)
    text = ("text", f"cosine of the {query} and the caption vectors (-: no caption)", lambda h: h.text_score)
    reranker = "the reranker's score (a logit: higher is better)"
    if result.mode == "hybrid":
        ranker = "RRF" if hybrid_ranker == "rrf" else hybrid_ranker
        fused = ("fused", f"{ranker} fusion of the {'reranker' if result.reranked else 'image'} ranking and the text ranking",
                 lambda h: h.score)
        rerank = [("reranker", reranker, lambda h: h.rerank_score)] if result.reranked else []
        return [fused, *rerank, (image[0], image[1] + " (-: a text item)", lambda h: h.image_score), text]
    if result.mode == "text":
        return [("text", text[1].replace(" (-: no caption)", ""), lambda h: h.score)]
    if result.mode == "ocr":
        return [("words", "0.5 for the share of query words read in the image, 0.4 when they appear as the phrase, 0.1 for whole words",
                 lambda h: h.score)]
    if result.reranked:  # "-": a candidate the reranker could not score (listed after the scored ones)
        return [("reranker", reranker, lambda h: h.rerank_score), image]
    return [(image[0], image[1], lambda h: h.score)]


def _fmt_score(value: float | None, decimals: int = 3) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


def _decimals(values: list[float | None]) -> int:
    """Decimals that print a column's different values differently (3 at least, 9 at most): RRF
    scores of neighbouring rows, such as 1/61 + 1/64 and 1/62 + 1/63, differ in the 5th."""
    distinct = {round(v, 12) for v in values if v is not None}  # RRF ties summed in another order are ties
    return next((d for d in range(3, 9) if len({f"{v:.{d}f}" for v in distinct}) == len(distinct)), 9)


@cli.command()
@click.option("--dir", "workdir", default="mmr-demo", show_default=True, type=click.Path(file_okay=False), help="Where the demo writes data, models and the database.")
@click.option("--train", is_flag=True, help="Train the encoder and the reranker here (~50 min on 2 CPU cores) instead of using the shipped ones.")
@click.option("--export", "export_dir", type=click.Path(file_okay=False), help="With --train: copy the trained models to this folder in the shipped layout (how the package's demo weights are made).")
@click.option("--model", help="Use this first stage instead of the demo's small one, and train a reranker for it (e.g. ViT-B-32; needs its weights).")
@click.option("--pretrained", help="Weights for --model: a tag (downloaded, needs internet) or a local file.")
@click.option("--quick", is_flag=True, help="A tiny run that trains everything (a few minutes) to check the setup; its numbers mean nothing.")
@click.option("--progress/--no-progress", default=None, help="Progress bars on stderr (default: on a terminal).")
@click.option("--json", "as_json", is_flag=True, help="Print the evaluation as JSON on stdout.")
def demo(workdir: str, train: bool, export_dir: str | None, model: str | None, pretrained: str | None, quick: bool,
         progress: bool | None, as_json: bool) -> None:
    """Offline end-to-end demo: make data, get a first stage and a reranker, index, evaluate, search.

    Needs no internet: it generates compositional scenes ("a small red circle left of a large blue
    square"), uses the tiny CLIP and cross-attention reranker shipped with the package (trained on
    these scenes by `mmr demo --train`), indexes everything into Milvus Lite, prints first-stage vs
    reranked Recall@K on held-out captions and shows the first held-out queries before and after
    reranking. --train trains both models here instead.
    """
    from .demo import QUICK, DemoSizes, run_demo

    _narrate_training()
    doc = run_demo(workdir, model=model, pretrained=pretrained, sizes=QUICK if quick else DemoSizes(), train=train,
                   export=export_dir, say=_echo, progress=progress, show_result=_echo if as_json else _out)
    if as_json:
        _emit_json(doc)


def _narrate_training() -> None:
    """Show the training steps' per-epoch lines (loss, validation R@1) under the demo's narration."""
    class Indented(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            prefix = "" if record.levelno == logging.INFO else f"{record.levelname}: "
            return f"      {prefix}{record.getMessage()}"

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Indented())
    train_log = logging.getLogger("mm_retrieval.training")
    train_log.addHandler(handler)
    train_log.setLevel(min(logging.INFO, logging.getLogger().level))
    train_log.propagate = False


@cli.command("train-encoder")
@click.argument("table", type=click.Path())
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory; use it later as --model DIR.")
@click.option("--model", default="mmr-tiny", show_default=True, help="open_clip architecture name or a model-config JSON file.")
@click.option("--pretrained", help="Start from these weights (tag or checkpoint file); default: from scratch.")
@click.option("--epochs", type=int, default=ENCODER_TRAIN.epochs, show_default=True,
              help="Passes over the table; a checkpoint is saved after each, so --resume can continue.")
@click.option("--batch-size", type=int, default=ENCODER_TRAIN.batch_size, show_default=True,
              help="Pairs per step, each the others' negatives (capped at the table's usable rows).")
@click.option("--lr", type=float, default=ENCODER_TRAIN.lr, show_default=True,
              help="Peak learning rate (cosine schedule with warmup); fine-tuning pretrained weights wants ~1e-5.")
@click.option("--image-size", type=int, help="Override the architecture's input size.")
@click.option("--workers", type=int, default=ENCODER_TRAIN.workers, show_default=True, help="Data-loading processes.")
@click.option("--device", type=DEVICE, default="auto", show_default=True,
              help="Where training runs (auto: CUDA when available, with mixed precision).")
@click.option("--seed", type=int, default=ENCODER_TRAIN.seed, show_default=True, help="Seeds the initial weights and the order of the data.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in the same --out.")
@click.option("--json", "as_json", is_flag=True, help="Print a summary as JSON on stdout.")
def train_encoder_cmd(table: str, out_dir: str, model: str, pretrained: str | None, epochs: int, batch_size: int, lr: float,
                      image_size: int | None, workers: int, device: str, seed: int, resume: bool, as_json: bool) -> None:
    """Train or fine-tune the dual encoder on TABLE's image-caption pairs (wraps open_clip_train).

    TABLE is a .csv/.parquet/.jsonl with 'path' and 'caption' columns. The result loads
    everywhere with --model OUT, e.g. `mmr index photos/ --model OUT`.
    """
    from .training import train_encoder

    logging.getLogger("mm_retrieval.training").setLevel(logging.INFO)
    res = train_encoder(table, out_dir, model=model, pretrained=pretrained, epochs=epochs, batch_size=batch_size, lr=lr,
                        image_size=image_size, workers=workers, device=device, seed=seed, resume=resume)
    summary = {"out_dir": str(res.out_dir), "model": res.model_name, "epochs": res.epochs, "pairs": res.n_pairs,
               "final_loss": res.final_loss, "seconds": round(res.seconds, 1)}
    if as_json:
        _emit_json(summary)
    else:
        _out(f"trained {res.model_name} on {res.n_pairs} pairs for {res.epochs} epochs in {res.seconds:.0f}s "
              f"(final loss {res.final_loss}) -> {res.out_dir}; use it with --model {res.out_dir}")


@cli.command("train-reranker")
@click.argument("table", type=click.Path())
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Checkpoint directory; use it as --rerank DIR.")
@common_options
@click.option("--epochs", type=int, default=RERANKER_TRAIN.epochs, show_default=True, help="At most; early stopping usually ends sooner.")
@click.option("--batch-size", type=int, default=RERANKER_TRAIN.batch_size, show_default=True, help="Captions per step (each with its negatives).")
@click.option("--lr", type=float, default=RERANKER_TRAIN.lr, show_default=True, help="AdamW learning rate (after a short warm-up).")
@click.option("--weight-decay", type=float, default=RERANKER_TRAIN.weight_decay, show_default=True, help="On matrices only: pulls the head toward the first stage.")
@click.option("--negatives", type=int, default=RERANKER_TRAIN.negatives, show_default=True, help="Hard negatives per caption, from the first stage's top ranks.")
@click.option("--hard-pool", type=int, default=RERANKER_TRAIN.hard_pool, show_default=True, help="How deep in the first stage's ranking negatives are drawn.")
@click.option("--val-fraction", type=float, default=RERANKER_TRAIN.val_fraction, show_default=True,
              help="Share of the captions held out for validation (early stopping and the reported R@1).")
@click.option("--split-by", default=",".join(RERANKER_TRAIN.split_by), show_default=True,
              help="Comma-separated columns: rows sharing a value in any of them stay on one side of the train/val "
                   "split (e.g. group,combination for the compositional set, so val measures unseen combinations).")
@click.option("--objective", type=click.Choice(RERANKER_OBJECTIVES), default=RERANKER_TRAIN.objective, show_default=True,
              help="separate: the head learns to rank on its own and the first stage's weight is fitted on val "
                   "(best when the first stage is strong on its training captions); residual: the head learns "
                   "corrections on top of the first stage's scores.")
@click.option("--patience", type=int, default=RERANKER_TRAIN.patience, show_default=True, help="Stop after this many epochs without a better validation R@1.")
@click.option("--binding/--no-binding", default=RERANKER_TRAIN.binding, show_default=True,
              help="Negatives that need binding: each caption's twins (same words, other order; same group) always "
                   "among its images, and its image against twin and rewritten captions (attributes or objects swapped).")
@click.option("--width", type=int, help="Reranker width (default 256).")
@click.option("--depth", type=int, help="Blocks (default 2).")
@click.option("--heads", type=int, help="Attention heads (default 4).")
@click.option("--kv-heads", type=int, help="Key/value heads: 1 multi-query, = heads multi-head (default 1).")
@click.option("--memory-dim", type=int, help="Cached width per image patch (default 128).")
@click.option("--phrase-dim", type=int,
              help="Phrase head width: the two phrases around a relation (\"a red circle LEFT OF a blue square\") each "
                   "attend to the image on their own, and the relation says where the two must lie; 0 = none "
                   f"(default {PHRASE_DIM} where the encoder's patches form a square grid).")
@click.option("--seed", type=int, default=RERANKER_TRAIN.seed, show_default=True, help="Seeds the train/val split, the initial weights and the sampling of negatives.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in the same --out.")
@click.option("--json", "as_json", is_flag=True, help="Print a summary as JSON on stdout.")
def train_reranker_cmd(table: str, out_dir: str, epochs: int, batch_size: int, lr: float, weight_decay: float, negatives: int,
                       hard_pool: int, val_fraction: float, split_by: str, objective: str, patience: int, binding: bool, width: int | None,
                       depth: int | None, heads: int | None, kv_heads: int | None, memory_dim: int | None,
                       phrase_dim: int | None, seed: int,
                       resume: bool, as_json: bool, **kwargs: Any) -> None:
    """Train the cross-attention reranker on TABLE's image-caption pairs.

    The ALBEF/BLIP image-text matching recipe: the dual encoder (--model, else the collection's)
    stays frozen; for each caption, hard negatives come from its top first-stage ranks; a listwise
    loss puts the true image first; a held-out validation split picks the best epoch, and the
    untrained, first-stage-equivalent reranker is kept if training never beats it. The reranker
    trains on the encoder's device (--device).
    """
    from .config import prune_none
    from .training.reranker import train_reranker

    opts = _pop_common(kwargs)
    pipe = _pipeline(opts)
    encoder = pipe.encoder
    encoder.warm_up()
    arch = prune_none({"width": width, "depth": depth, "heads": heads, "kv_heads": kv_heads, "memory_dim": memory_dim,
                       "phrase_dim": phrase_dim})
    res = train_reranker(table, out_dir, encoder=encoder, device=pipe.config.encoder.params.get("device", "auto"),
                         reranker_config=arch or None, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                         negatives=negatives, hard_pool=hard_pool, val_fraction=val_fraction, patience=patience, seed=seed,
                         resume=resume, split_by=tuple(c.strip() for c in split_by.split(",") if c.strip()),
                         objective=objective, binding=binding)
    summary = {"out_dir": str(res.out_dir), "epochs_run": res.epochs_run, "best_epoch": res.best_epoch, "val": res.val,
               "n_train": res.n_train, "n_val": res.n_val, "seconds": round(res.seconds, 1)}
    if as_json:
        _emit_json(summary)
        return
    fs, rr = res.val["first_stage"], res.val["reranked"]
    _out(f"trained for {res.epochs_run} epochs (best {res.best_epoch}) on {res.n_train} captions in {res.seconds:.0f}s -> {res.out_dir}")
    _out(f"validation R@1: first stage {fs['R@1']:.3f}, reranked {rr['R@1']:.3f}; use it with --rerank {res.out_dir}")


@cli.command()
@click.argument("query")
@click.argument("image")
@common_options
@click.option("--rerank", "rerank_path", type=click.Path(), help=f"The reranker to explain ({RERANKER_REF}); default: the config's.")
@click.option("-o", "--out", "out", default="explain.png", show_default=True, type=click.Path(dir_okay=False), help="PNG to write.")
@click.option("--head", type=int, help="Show one attention head instead of the mean over heads.")
@click.option("--layer", type=int, help="Show one attention layer instead of the mean over layers.")
@click.option("--json", "as_json", is_flag=True, help="Also print the maps as JSON on stdout.")
@click.option("--server", "server_url", metavar="URL", help="Explain through the `mmr serve` at URL (with its reranker, "
              "loaded there). Default: the one serving the same --db and --collection, when running, unless --config, --model, "
              "--pretrained, --device or another --rerank is given.")
def explain(query: str, image: str, rerank_path: str | None, out: str, head: int | None, layer: int | None, as_json: bool,
            server_url: str | None, **kwargs: Any) -> None:
    """Draw the reranker's attention over IMAGE (a file or an indexed id) for QUERY, per query word.

    The PNG shows the image, the whole query's attention, and one panel per word: which image
    regions each word looked at when the reranker scored the pair.
    """
    from .query import validate_query

    validate_query(query)  # fail before loading any model
    opts = _pop_common(kwargs)
    server = _search_server(opts, server_url, rerank_path, verb=("explains", "explaining"))
    if server is not None:  # a running `mmr serve` answers: no model loaded here
        import numpy as np

        from .explain import render_maps
        from .server.discovery import remote_explain

        doc, pil = remote_explain(server, query, image, layer=layer, head=head, api_key=os.environ.get("MMR_API_KEY"))
        path = render_maps(pil, doc["query"], doc["words"], np.asarray(doc["view"], np.float32), out, score=doc["score"],
                           retrieval_score=doc["retrieval_score"], head=head, layer=layer)
        shown = {key: v for key, v in doc.items() if key not in ("path", "view")}  # as Explanation.to_dict
    else:
        from .explain import attention_maps, render_grid

        ex = attention_maps(_pipeline(opts, reranker=rerank_path), query, image)
        path = render_grid(ex, out, head=head, layer=layer)
        shown = ex.to_dict()
    if as_json:
        _emit_json({**shown, "png": str(path)})
    else:
        _out(f"reranker {shown['score']:.3f} (first stage {shown['retrieval_score']:.3f}) for {len(shown['words'])} words -> {path}")


@cli.command("eval")
@click.argument("table", type=click.Path())
@common_options
@click.option("--rerank", "rerank_path", type=click.Path(), help=f"Also evaluate this reranker ({RERANKER_REF}).")
@click.option("--candidates", type=int, default=100, show_default=True, help="First-stage candidates the reranker sees.")
@click.option("--no-index", is_flag=True, help="Don't index TABLE's images first (they must already be in the collection).")
@click.option("--mode", type=click.Choice(["image", "text", "hybrid"]), default="image", show_default=True, help="Which vectors the first stage searches.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.option("--server", "server_url", metavar="URL", help="Evaluate through the `mmr serve` at URL (models loaded there; "
              "it indexes nothing: TABLE's images must be in the collection, or pass --no-index). Default: the one serving "
              "the same --db and --collection, when running, unless --config, --model, --pretrained, --device or another "
              "--rerank is given.")
def eval_cmd(table: str, rerank_path: str | None, candidates: int, no_index: bool, mode: str, as_json: bool,
             server_url: str | None, **kwargs: Any) -> None:
    """Recall@1/5/10 of the first stage (and of the reranked list) on TABLE's captions.

    Each caption is a query; its relevant images are the rows with that caption; the gallery is
    the whole collection.
    """
    opts = _pop_common(kwargs)
    server = _search_server(opts, server_url, rerank_path, verb=("evaluates", "evaluating"))
    if server is not None:  # a running `mmr serve` ranks the captions: no model loaded here
        import time

        from .evaluation import load_queries, usable_captions
        from .server.discovery import remote_eval

        t0 = time.perf_counter()
        queries = load_queries(table)
        doc = remote_eval(server, queries, usable_captions(queries), mode=mode, candidates=candidates,
                          rerank=rerank_path is not None, require_indexed=not no_index, api_key=os.environ.get("MMR_API_KEY"))
        doc["seconds"] = round(time.perf_counter() - t0, 2)
    else:
        from .evaluation import evaluate

        pipe = _pipeline(opts, reranker=rerank_path)
        doc = evaluate(pipe, table, candidates=candidates, rerank=True if rerank_path is not None else None,
                       index=not no_index, mode=mode)
    if as_json:
        _emit_json(doc)
        return
    _out(f"{doc['n_queries']} queries against {doc['gallery']} items, {doc['mode']} mode (candidates {doc['candidates']})")
    _out("              " + "  ".join(f"{k:>6}" for k in doc["first_stage"]))
    for name in ("first_stage", "reranked"):
        if doc.get(name):
            _out(f"{name:<12}  " + "  ".join(f"{v:6.3f}" for v in doc[name].values()))


@cli.group()
def cache() -> None:
    """The token cache the reranker reads (image tokens stored next to the collection)."""


@cache.command("info")
@common_options
@click.option("--json", "as_json", is_flag=True, help="Print the collection and its caches as JSON on stdout.")
def cache_info_cmd(as_json: bool, **kwargs: Any) -> None:
    """List the collection's token caches: items and bytes per image."""
    from .backfill import cache_info

    pipe = _pipeline(_pop_common(kwargs))
    pipe.store.require()  # a mistyped --collection is an error naming those there are, not "0 items"
    info = cache_info(pipe.store)
    if as_json:
        _emit_json({"collection": pipe.store.name, "items": pipe.store.count(), "caches": info})
        return
    _out(f"collection {pipe.store.name!r}: {pipe.store.count()} items")
    for c in info:
        held = c.get("info") or {}
        shape = f"[{held['tokens']}, {held['width']}] {held['storage']}" if {"tokens", "width", "storage"} <= set(held) else c["shape"]
        _out(f"  {c['fingerprint']}: {c['items']} items, {c['bytes_per_item']:,} B/item {shape}, {c['file_bytes']:,} B on disk")
        s = c["slots"]
        _out(f"    slots: {s['live_slots']} live ({s['live_bytes']:,} B), {s['free_slots']} free ({s['free_bytes']:,} B; "
             "reused by later writes, `mmr cache compact` gives them back)")
        if s.get("fill") == "lazy":
            _out(f"    filled lazily (the first rerank that meets an image computes its tokens); budget: {s.get('budget') or 'unbounded'}")
    if not info:
        _out("  no token cache (run `mmr cache build`)")


@cache.command("compact")
@common_options
@click.option("--json", "as_json", is_flag=True, help="Print what each cache did as JSON on stdout.")
def cache_compact_cmd(as_json: bool, **kwargs: Any) -> None:
    """Shrink the token caches' files to their live slots (searches keep running meanwhile)."""
    from .tokencache import compact_all

    pipe = _pipeline(_pop_common(kwargs))
    pipe.store.require()
    done = compact_all(pipe.store.cache_dir())
    if as_json:
        _emit_json({"collection": pipe.store.name, "caches": done})
        return
    for d in done:
        what = "compacted" if d["compacted"] else "nothing to compact"
        dropped = f"; {d['dropped']} damaged slots dropped" if d["dropped"] else ""
        _out(f"{d['cache']}: {what}, {d['bytes_before']:,} -> {d['bytes_after']:,} B on disk{dropped}")
    if not done:
        _out(f"collection {pipe.store.name!r} has no token cache")


@cache.command("build")
@common_options
@click.option("--rerank", "rerank_path", type=click.Path(), help=f"Build what this reranker reads for each image (its memory, or BLIP's vision tokens) instead of raw tokens; {RERANKER_REF}.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: on a terminal).")
def cache_build_cmd(rerank_path: str | None, as_json: bool, progress: bool | None, **kwargs: Any) -> None:
    """Fill the token cache for every indexed item that lacks tokens."""
    from .backfill import build_token_cache

    pipe = _pipeline(_pop_common(kwargs), reranker=rerank_path, tokens="eager")  # ahead of time, even where searches fill lazily
    pipe.store.require()  # before a token cache file is created for a collection that isn't there
    doc = build_token_cache(pipe.encoder, pipe.store, pipe.token_writer(), image_side=pipe.image_side(), progress=progress)
    if as_json:
        _emit_json(doc)
        return
    _out(f"token cache {doc['cache']}: {doc['items']} items ({doc['bytes_per_item']:,} B each); "
          f"{doc['from_raw_tokens']} derived from raw tokens, {doc['encoded']} encoded, {len(doc['failed'])} failed")
    for f in doc["failed"][:20]:
        _out(f"  {f['path']}: {f['error']}")


@cli.command()
@common_options
@click.option("--backfill", is_flag=True, help="Add the perceptual hash to indexed images that lack one (a collection indexed "
              "before hashes were stored): each file is read once, no model runs, nothing is re-indexed.")
@click.option("--max-distance", type=click.IntRange(0, 64), default=None, metavar="BITS",
              help="Largest pHash difference (of 64 bits) for two images to be copies (default 14; measured in benchmarks/RESULTS.md).")
@click.option("--min-similarity", type=click.FloatRange(-1.0, 1.0), default=None, metavar="COS",
              help="Smallest image-vector similarity for two images to be copies (default 0.80; model-specific).")
@click.option("--filter", "filter_", default="", help="Only look at the items matching this Milvus filter expression.")
@click.option("--json", "as_json", is_flag=True, help="Print the groups (or the backfill's report) as JSON on stdout.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: on a terminal).")
def duplicates(backfill: bool, max_distance: int | None, min_similarity: float | None, filter_: str, as_json: bool,
               progress: bool | None, **kwargs: Any) -> None:
    """Groups of near-duplicate images: re-saved, resized, recompressed, lightly cropped or turned
    copies of one photo, and bursts.

    Two images are copies when their image vectors and their perceptual hashes (stored at index
    time) are both close; candidates come from the index (each image's nearest neighbours). Each
    group names the one to keep (the largest, then the oldest). Nothing is deleted or moved.
    """
    from .duplicates import BACKFILL_HINT, backfill_hashes, find_groups
    from .neardup import MAX_HASH_DISTANCE, MIN_SIMILARITY

    pipe = _pipeline(_pop_common(kwargs))
    pipe.store.require()
    if backfill:
        doc = backfill_hashes(pipe.store, progress=progress)
        if as_json:
            _emit_json(doc)
            return
        _out(f"collection {doc['collection']!r}: {doc['hashed']} images hashed, {len(doc['failed'])} failed")
        for f in doc["failed"][:20]:
            _out(f"  {f['path']}: {f['error']}")
        return
    report = find_groups(pipe.store, min_similarity=MIN_SIMILARITY if min_similarity is None else min_similarity,
                         max_distance=MAX_HASH_DISTANCE if max_distance is None else max_distance, filter=filter_, progress=progress)
    if report.unhashed:
        _echo(f"warning: {report.unhashed} of {report.images} images have no perceptual hash and were left out: {BACKFILL_HINT}")
    if as_json:
        _emit_json(report.to_dict())
        return
    copies = sum(len(g.items) - 1 for g in report.groups)
    _out(f"{len(report.groups)} groups of near-duplicates among {report.images} images ({copies} copies); nothing was deleted")
    for n, g in enumerate(report.groups, 1):
        _out(f"group {n} ({len(g.items)} images, hash distance <= {g.max_distance}, similarity >= {g.min_similarity:.3f}):")
        for it in g.items:
            size = f"{it['width']}x{it['height']}" if it["width"] and it["height"] else "?x?"
            mark = "keep" if it["id"] == g.keep else "    "
            _out(f"  {mark}  {size:>11}  {it['file_size']:>10,} B  {it['taken'] or '':<25}  {it['path']}")


@cli.command()
@common_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on; 0.0.0.0 exposes the API to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port to listen on.")
@click.option("--rerank", "rerank_path", type=click.Path(), help=f"The reranker ({RERANKER_REF}); without it, scores are the first stage's.")
@click.option("--api-key", envvar="MMR_API_KEY", help="Require this key (Authorization: Bearer KEY or X-API-Key) [env MMR_API_KEY].")
@click.option("--model-name", help="Model name reported by the vLLM-style endpoints (default: mmr/<checkpoint dir>).")
@click.option("--max-documents", type=click.IntRange(1), default=1000, show_default=True, help="Documents per rerank request.")
@click.option("--max-body-mb", type=click.FloatRange(0.001), default=32.0, show_default=True, help="Largest request body, in MiB.")
@click.option("--max-image-mb", type=click.FloatRange(0.001), default=10.0, show_default=True, help="Largest inline image (rerank document or /search image query), in MiB.")
@click.option("--max-batch", type=click.IntRange(1), default=64, show_default=True, help="Requests batched into one forward pass (1: no batching).")
@click.option("--batch-wait-ms", type=click.FloatRange(0), default=2.0, show_default=True, help="How long a request waits for others to batch with.")
@click.option("--media-root", "media_roots", multiple=True, type=click.Path(file_okay=False),
              help="The page also shows indexed files whose real path lies under DIR (for folders indexed through symlinks); repeatable.")
@click.option("--watch", "watch_folder", type=click.Path(file_okay=False), metavar="FOLDER",
              help="Also keep the collection in step with FOLDER, as `mmr watch FOLDER` does, in this process.")
@click.option("--access-log/--no-access-log", default=True, show_default=True,
              help="One stderr line per request: method, path, status, milliseconds (never the key, query string or body).")
def serve(host: str, port: int, rerank_path: str | None, api_key: str | None, model_name: str | None, max_documents: int,
          max_body_mb: float, max_image_mb: float, max_batch: int, batch_wait_ms: float, media_roots: tuple[str, ...],
          access_log: bool, watch_folder: str | None, **kwargs: Any) -> None:
    """HTTP API: search, and reranking in the Cohere, TEI and vLLM wire formats; a search page.

    \b
    GET  /            the search page (results, rerank on/off, filters, attention heatmaps)
    POST /search      {query | image | image_id, k, offset, candidates, filter, rerank, mode} -> `mmr search --json`
    POST /v2/rerank   Cohere v2 (Milvus rerank function: provider "cohere", base_url http://HOST:PORT/v2)
    POST /rerank      Hugging Face TEI (body with "texts"), or vLLM (body with "documents")
    POST /v1/rerank   vLLM / Jina; documents may be image_url content parts
    GET  /healthz, /readyz, /docs

    A document is an indexed image's path as stored, its id, or an image inline as a data URI.
    While it runs, `mmr search` on the same --db and --collection asks it instead of loading models.
    """
    from .server import ServerConfig
    from .server.run import serve as run_server

    mib = 1024 * 1024
    config = ServerConfig(host=host, port=port, api_key=api_key or None, model_name=model_name, max_documents=max_documents,
                          max_body_bytes=int(max_body_mb * mib), max_image_bytes=int(max_image_mb * mib),
                          max_batch_requests=max_batch, batch_wait_ms=batch_wait_ms, media_roots=tuple(media_roots))
    run_server(_pipeline(_pop_common(kwargs), reranker=rerank_path), config, access_log=access_log, watch=watch_folder)


@cli.command()
@click.option("--suite", "suites", multiple=True, default=("all",), show_default=True,
              type=click.Choice(["encode", "search", "rerank", "blip", "quality", "video", "scale", "cli", "photos", "dupes", "ocr", "probe", "all"]), help="Which suite(s) to run; repeat the option for several.")
@click.option("--blip", "blip", metavar="NAME_OR_DIR", help="BLIP checkpoint for the blip suite (hub name in the local Hugging Face cache, or a directory). Default: random BLIP-base-sized weights (timing only; tiny with --quick).")
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="Where models run.")
@click.option("--quick", is_flag=True, help="Tiny sizes: checks that every suite runs (seconds), numbers mean nothing.")
@click.option("--workdir", type=click.Path(file_okay=False), help="Keep generated images/data here between runs (default: a temporary folder).")
@click.option("--out", "out_file", type=click.Path(dir_okay=False), help="Also write the JSON document to this file.")
@click.option("--markdown", "markdown_file", type=click.Path(dir_okay=False), help="Write the results table (e.g. benchmarks/RESULTS.md).")
@click.option("--from", "from_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Run nothing: merge these saved --out documents (later files win per suite) and report them.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON document on stdout (the summary then goes to stderr).")
def bench(suites: tuple[str, ...], blip: str | None, device: str, quick: bool, workdir: str | None, out_file: str | None,
          markdown_file: str | None, from_files: tuple[str, ...], as_json: bool) -> None:
    """Benchmarks, each figure measured side by side with what it is compared against.

    \b
    encode   indexing throughput (files -> Milvus Lite) vs the bare open_clip forward pass
    search   our search stage vs a raw MilvusClient.search; ANN recall@10 vs exact search
    rerank   reranker latency and token-cache bytes vs BLIP image-text matching
    blip     BLIP reranker: cached tokens vs re-encoding, per storage option; bytes/image
    quality  first stage vs reranked Recall@K on held-out compositional captions
    video    video decode frames/s, segments/min, index s per video hour; grouping search
    scale    index images/s in one process vs --ray with 1 and 2 actors; Ray per batch; driver writes
    cli      seconds `mmr` takes to refuse a bad filter, table, model or collection (no model loaded)
    """
    from pathlib import Path

    from .bench import SUITES, merge, run_benchmarks
    from .bench.report import human, markdown

    if from_files:
        doc = merge([json.loads(Path(f).read_text()) for f in from_files])
    else:
        chosen = SUITES if "all" in suites else tuple(dict.fromkeys(suites))
        doc = run_benchmarks(chosen, device=device, quick=quick, workdir=workdir, blip=blip)
    if out_file:
        Path(out_file).parent.mkdir(parents=True, exist_ok=True)
        Path(out_file).write_text(json.dumps(doc, indent=2) + "\n")
    if markdown_file:
        Path(markdown_file).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown_file).write_text(markdown(doc))
    if as_json:
        _echo(human(doc))  # stdout holds only the JSON document
        _emit_json(doc)
    else:
        _out(human(doc))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON on stdout.")
def plugins(as_json: bool) -> None:
    """Every registered stage (kind, name, origin) and plugins that failed to load."""
    from . import registry

    entries = registry.list_stages(load=True)
    errors = registry.load_errors()
    if as_json:
        _emit_json({
            "stages": [{"kind": e.kind, "name": e.name, "origin": e.origin, "target": e.target, "error": e.error} for e in entries],
            "errors": [{"entry_point": e.entry_point, "origin": e.origin, "error": e.error} for e in errors],
        })
        return
    width = max((len(f"{e.kind}/{e.name}") for e in entries), default=10)
    for e in entries:
        status = f"  FAILED: {e.error}" if e.error else ""
        _out(f"{e.kind + '/' + e.name:<{width}}  {e.origin:<16} {e.target}{status}")
    for err in errors:
        if not any(f"{e.kind}/{e.name}" == err.entry_point for e in entries):
            _out(f"plugin {err.entry_point} ({err.origin}) failed to load: {err.error}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mmr`` console script; returns the exit code."""
    try:
        cli.main(args=argv, prog_name="mmr", standalone_mode=False)
    except click.exceptions.Abort as e:
        # Ctrl-C: an index or sync run says what landed and that re-running resumes (IndexInterrupted)
        stopped = e.__cause__
        _echo(str(stopped) if stopped is not None and hasattr(stopped, "report") else "aborted")
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except MMRError as e:
        _echo(f"error: {e}")
        if os.environ.get("MMR_DEBUG"):
            raise
        return e.exit_code
    except KeyboardInterrupt as e:
        _echo(str(e) if hasattr(e, "report") else "interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())


def run() -> None:
    """Console-script wrapper: exit with :func:`main`'s code."""
    sys.exit(main())
