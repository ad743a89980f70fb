"""The isolated cluster's S3 store (cluster/s3_store.py): it admits its own key alone on every port
it opens, other accounts can neither reach its servers nor read its files, and its objects survive
a SIGKILL of all its processes; PyArrow's and boto3's uploads work unchanged."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from cluster.services import live_processes_in_session, start_scratch_object_store

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the store runs in namespaces of its own: root only")

# Another account's attempts, standard library only: each request without credentials, with a
# made-up key, and with the store's access key but a forged signature; and each file read.
INTRUDER = textwrap.dedent("""
    import json, os, sys, urllib.request, urllib.error
    ports, bucket, key, root = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    date = "20261207T000000Z"
    def forged(access):
        return {"x-amz-date": date, "x-amz-content-sha256": "UNSIGNED-PAYLOAD",
                "Authorization": f"AWS4-HMAC-SHA256 Credential={access}/20261207/us-east-1/s3/aws4_request, "
                                 "SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature=" + "0" * 64}
    answers = {}
    for port in ports:
        for method, path in (("GET", f"/{bucket}/{key}"), ("GET", f"/{bucket}"), ("PUT", f"/{bucket}/planted"),
                             ("DELETE", f"/{bucket}/{key}"), ("GET", "/"),
                             ("GET", f"/v1/AUTH_aiayn/{bucket}/{key}"), ("PUT", f"/v1/AUTH_aiayn/{bucket}/planted")):
            for who, headers in (("anonymous", {}), ("made-up key", forged("AKIAIOSFODNN7EXAMPLE")),
                                 ("forged signature", forged("aiayn:aiayn"))):
                request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, headers=headers,
                                                 data=b"planted" if method == "PUT" else None)
                try:
                    with urllib.request.urlopen(request, timeout=10) as response:
                        answer = response.status
                except urllib.error.HTTPError as error:
                    answer = error.code
                    if b"owner" in error.read():
                        answer = "leaked the object"
                except urllib.error.URLError as error:
                    answer = type(error.reason).__name__
                except OSError as error:
                    answer = type(error).__name__
                answers[f"{method} :{port}{path} {who}"] = answer
    readable = []
    for directory, _, files in os.walk(root, onerror=lambda error: None):
        readable.append(directory)
        for name in files:
            try:
                open(os.path.join(directory, name), "rb").close()
                readable.append(os.path.join(directory, name))
            except OSError:
                pass
    print(json.dumps({"answers": answers, "readable": readable}))
""")


def _store_processes(service) -> list[int]:
    """The store's processes: its session, and the servers (which leave it) inside its PID namespace."""
    session = live_processes_in_session(service.process.pid)
    namespaces = {os.readlink(f"/proc/{pid}/ns/pid_for_children") for pid in session}
    found = set(session)
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if os.readlink(entry / "ns" / "pid") in namespaces:
                found.add(int(entry.name))
        except OSError:
            continue
    return sorted(found)


def _listening_ports(pid: int) -> set[int]:
    """TCP ports listened on in `pid`'s network namespace."""
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _filesystem(env: dict) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key=env["AWS_ACCESS_KEY_ID"],
                             secret_key=env["AWS_SECRET_ACCESS_KEY"], region=env["AWS_DEFAULT_REGION"])


@pytest.fixture
def open_directory():
    """A directory every account may enter (pytest's own are private): the store's own
    directories must keep the intruder out."""
    directory = Path(tempfile.mkdtemp(prefix="aiayn-test-store-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory)


def test_another_account_gets_nothing_through_any_port_of_the_store_nor_from_its_files(open_directory) -> None:
    scratch = open_directory
    service, env = start_scratch_object_store(scratch, "bucket")
    try:
        store = _filesystem(env)
        with store.open_output_stream("bucket/secret.txt") as handle:
            handle.write(b"the owner's")
        proxy_port = int(env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
        servers = set().union(*(_listening_ports(pid) for pid in _store_processes(service)))
        assert len(servers - {proxy_port}) == 3  # Swift's account, container and object servers
        ports = sorted(servers | {proxy_port})
        intruder = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/env", "python3", "-c", INTRUDER,
             json.dumps(ports), "bucket", "secret.txt", str(scratch)],
            capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin"})
        assert intruder.returncode == 0, intruder.stderr
        seen = json.loads(intruder.stdout)
        for attempt, answer in seen["answers"].items():
            if f":{proxy_port}/" in attempt:
                assert isinstance(answer, int) and 400 <= answer < 500, f"{attempt}: {answer}"
            else:  # the servers behind the proxy are in the store's network namespace: unreachable
                assert answer == "ConnectionRefusedError", f"{attempt}: {answer}"
        private = [path for path in seen["readable"] if path.startswith((str(scratch / "store"),
                                                                         str(scratch / "credentials")))]
        assert private == [] and str(scratch) in seen["readable"]  # it did look
        assert store.open_input_file("bucket/secret.txt").read() == b"the owner's"
        assert store.get_file_info("bucket/planted").type == pafs.FileType.NotFound
    finally:
        service.stop()
    assert not [pid for pid in _store_processes(service)], "a process of the store outlived stop()"


def test_objects_survive_a_sigkill_of_the_store_and_pyarrow_and_boto3_uploads_work(tmp_path) -> None:
    import boto3

    service, env = start_scratch_object_store(tmp_path, "bucket")
    large = os.urandom(12 * 1024 * 1024)  # PyArrow uploads it in parts (multipart)
    try:
        store = _filesystem(env)
        with store.open_output_stream("bucket/run/large.bin") as handle:
            handle.write(large)
        store.create_dir("bucket/run/empty")  # a directory marker
        pafs.copy_files("bucket/run/large.bin", "bucket/run/copy.bin", source_filesystem=store,
                        destination_filesystem=store)
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                              aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        client.put_object(Bucket="bucket", Key="boto/crc32", Body=b"trailing", ChecksumAlgorithm="CRC32")
        client.upload_fileobj(io.BytesIO(b"streamed" * 1000), "bucket", "boto/streamed")
        processes = _store_processes(service)
        assert len(processes) >= 5  # unshare, the proxy and its three servers
        for pid in processes:
            os.kill(pid, signal.SIGKILL)
        service.process.wait(timeout=30)
    finally:
        service.stop()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in processes) and time.monotonic() < deadline:
        time.sleep(0.1)

    service, env = start_scratch_object_store(tmp_path, "bucket")  # the same directory, a new port
    try:
        store = _filesystem(env)
        assert store.open_input_file("bucket/run/large.bin").read() == large
        assert store.open_input_file("bucket/run/copy.bin").read() == large
        assert store.get_file_info("bucket/run/empty").type == pafs.FileType.Directory
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                              aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        assert client.get_object(Bucket="bucket", Key="boto/crc32")["Body"].read() == b"trailing"
        assert client.get_object(Bucket="bucket", Key="boto/streamed")["Body"].read() == b"streamed" * 1000
    finally:
        service.stop()
