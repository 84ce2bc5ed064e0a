"""The one S3 access layer and the one repository layout: plumbing.s3, plumbing.locations, and the
repositories' read side (list, ranged/streamed reads, header rewrite) against moto and a real directory."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError
from s3_support import FaultProxy, MotoServer, boto3_client

from mediaseal.codec.header import KINDS
from mediaseal.plumbing import s3 as s3io
from mediaseal.plumbing.locations import (
    LocationError,
    RepositoryKey,
    RepositoryURL,
    parse_repository_url,
    split_package_url,
)
from mediaseal.uploader import FilesystemRepository, PackageNotFoundError, RepositoryError, open_reader

pytestmark = pytest.mark.timeout(60)

KEY = "call/2026/11/28/rec-1.mseal"


# -- the layout ---------------------------------------------------------------------------------------


def test_every_codec_kind_round_trips_as_a_key() -> None:
    for kind in KINDS:
        k = RepositoryKey.from_capture(kind, "2026-02-03T04:05:06Z", "rec-9")
        assert k.key == f"{kind}/2026/02/03/rec-9.mseal"
        assert RepositoryKey.parse(k.key) == k and k.date is not None and k.date.isoformat() == "2026-02-03"
    assert RepositoryKey.find("site-a/x/screen/2026/13/40/r.mseal") == (
        "site-a/x", RepositoryKey("screen", 2026, 13, 40, "r"))
    assert RepositoryKey.parse("screen/2026/13/40/r.mseal").date is None  # kept, not a real day
    for bad in ("video/2026/01/01/r.mseal", "call/2026/01/01/r.bin", "x/call/2026/01/01/r.mseal"):
        with pytest.raises(LocationError):
            RepositoryKey.parse(bad)
    with pytest.raises(LocationError):
        RepositoryKey.from_capture("call", "yesterday", "r")
    with pytest.raises(LocationError):
        RepositoryKey.from_capture("call", "2026-01-01T00:00:00Z", "a/b")


def test_repository_urls() -> None:
    assert parse_repository_url("s3://rec/site-a/") == RepositoryURL("s3", bucket="rec", prefix="site-a")
    assert str(parse_repository_url("s3://rec")) == "s3://rec"
    assert parse_repository_url("file:///srv/rec").path == Path("/srv/rec")
    assert parse_repository_url("/srv/rec").path == Path("/srv/rec")
    for bad in ("s3://", "s3://b/a//c", "s3://b/../c", "file://host/x", "http://x/y", "s3://b?x=1"):
        with pytest.raises(LocationError):
            parse_repository_url(bad)
    repo, key = split_package_url("s3://rec/site-a/call/2026/11/28/rec-1.mseal")
    assert (str(repo), key) == ("s3://rec/site-a", KEY)
    repo, key = split_package_url("file:///srv/other/name.mseal")
    assert (str(repo), key) == ("file:///srv/other", "name.mseal")
    assert parse_repository_url("s3://rec/site-a").object_key(KEY) == f"site-a/{KEY}"
    with pytest.raises(LocationError):
        parse_repository_url("s3://rec").object_key("a/../b")


# -- the error translation ------------------------------------------------------------------------------


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "said  the\nstore"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "HeadObject")


def test_translation_classes_keep_the_code() -> None:
    cases = {("NoSuchKey", 404): s3io.S3NotFoundError, ("404", 404): s3io.S3NotFoundError,
             ("NoSuchBucket", 404): s3io.S3NotFoundError, ("AccessDenied", 403): s3io.S3AccessDeniedError,
             ("SlowDown", 503): s3io.S3TransientError, ("BadDigest", 400): s3io.S3TransientError,
             ("Whatever", 500): s3io.S3TransientError, ("Whatever", 429): s3io.S3TransientError,
             ("InvalidArgument", 400): s3io.S3PermanentError, ("Whatever", 400): s3io.S3PermanentError}
    for (code, status), cls in cases.items():
        e = s3io.translate("HeadObject", "s3://b/k", client_error(code, status))
        assert type(e) is cls and e.code == code and e.status == status, (code, type(e))
        assert str(e) == f"s3 HeadObject s3://b/k: {code} (said the store)"
    down = s3io.translate("GetObject", "s3://b/k", EndpointConnectionError(endpoint_url="http://127.0.0.1:9"))
    assert isinstance(down, s3io.S3TransientError) and down.code == "EndpointConnectionError"
    assert isinstance(s3io.translate("GetObject", "s3://b", NoCredentialsError()), s3io.S3AccessDeniedError)
    assert isinstance(s3io.translate("GetObject", "s3://b", TimeoutError()), s3io.S3TransientError)


# -- the read side ----------------------------------------------------------------------------------------


async def test_s3_read_side_and_header_rewrite(moto_server: MotoServer, s3_bucket: str) -> None:
    s3 = boto3_client(moto_server.url)
    body = os.urandom((6 << 20) + 123)  # over one 5 MiB part: the rewrite goes multipart
    old = b"H" * 100 + body
    s3.put_object(Bucket=s3_bucket, Key=f"site/{KEY}", Body=old, ContentType="application/vnd.mediaseal",
                  Metadata={"package-sha256": hashlib.sha256(old).hexdigest(), "kind": "call"})
    s3.put_object(Bucket=s3_bucket, Key="site/call/2026/11/28/.rec-2.mseal", Body=b"temp")
    s3.put_object(Bucket=s3_bucket, Key="site/readme.txt", Body=b"not a package")
    repo = open_reader(f"s3://{s3_bucket}/site", endpoint_url=moto_server.url)
    try:
        assert [(o.key, o.size) async for o in repo.list()] == [(KEY, len(old))]
        assert repo.location(KEY) == f"s3://{s3_bucket}/site/{KEY}"
        head, size = await repo.read_head(KEY, 100)
        assert (head, size) == (b"H" * 100, len(old))
        await repo.rewrite_head(KEY, 100, b"new header", part_size=5 << 20)
        new = b"new header" + body
        obj = s3.get_object(Bucket=s3_bucket, Key=f"site/{KEY}")
        assert obj["Body"].read() == new and obj["ContentType"] == "application/vnd.mediaseal"
        assert obj["Metadata"] == {"package-sha256": hashlib.sha256(new).hexdigest(), "kind": "call"}
        assert await repo.read(KEY, 0, 10) == b"new header"
        # A rewrite pinned to a version that is no longer there fails and leaves no upload behind.
        await repo.read_head(KEY, 10)
        s3.put_object(Bucket=s3_bucket, Key=f"site/{KEY}", Body=b"replaced by someone else")
        with pytest.raises(RepositoryError, match="changed while it was being read"):
            await repo.rewrite_head(KEY, 10, b"x", part_size=5 << 20)
        assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
        with pytest.raises(PackageNotFoundError):
            await repo.size("call/2026/11/28/none.mseal")
    finally:
        await repo.close()


async def test_streaming_upload_aborts_what_it_started(fault_proxy: FaultProxy, moto_server: MotoServer,
                                                       s3_bucket: str) -> None:
    fault_proxy.fail(403, when=lambda r: r.op == "UploadPart" and r.part == 2)
    settings = s3io.ClientSettings(endpoint_url=fault_proxy.url, retries=s3io.COMMAND)
    async with s3io.open_client(settings) as client:
        up = s3io.StreamingUpload(s3io.S3Bucket(client, s3_bucket, settings=settings), "big", 5 << 20)
        with pytest.raises(s3io.S3PermanentError):
            await up.write(os.urandom(11 << 20))
        await up.abort()
    assert boto3_client(moto_server.url).list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert fault_proxy.count("UploadPart") == 2  # a permanent error is not retried


async def test_filesystem_read_side_and_header_rewrite(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    path = root / KEY
    path.parent.mkdir(parents=True)
    path.write_bytes(b"H" * 8 + b"body")
    path.chmod(0o640)
    (path.parent / ".rec-1.mseal.tmp").write_bytes(b"staging")
    repo = FilesystemRepository(root)
    assert [o.key async for o in repo.list()] == [KEY]
    assert await repo.read_head(KEY, 3) == (b"HHH", 12)
    assert [b async for b in repo.iter_read(KEY, 6, 6, 4)] == [b"HHbo", b"dy"]
    await repo.rewrite_head(KEY, 8, b"new:")
    assert path.read_bytes() == b"new:body" and (path.stat().st_mode & 0o777) == 0o640
    assert sorted(p.name for p in path.parent.iterdir()) == [".rec-1.mseal.tmp", "rec-1.mseal"]
    with pytest.raises(PackageNotFoundError):
        await repo.size("call/2026/11/28/none.mseal")
    with pytest.raises(RepositoryError, match="not a directory"):
        [o async for o in FilesystemRepository(tmp_path / "missing").list()]
