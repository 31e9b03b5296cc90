"""`sdlab serve` as a process: a restart keeps the job history (jobs cut off are marked interrupted),
stopping answers the clients waiting on jobs, an unusable history is a one-line error, authentication
guards every route, binding beyond the loopback needs it, without it only loopback Host names are answered (DNS
rebinding), and the body-size limit."""

from __future__ import annotations

import base64
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from server_fixtures import free_port, server_env, start_server

LONG = {"prompt": "a slow one", "steps": 150}


def _wait_status(client: httpx.Client, job_id: str, statuses: tuple[str, ...]) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {statuses}: {job}")


def test_restart_keeps_history_and_marks_cut_off_jobs_interrupted(tmp_path):
    """A crashed server's unfinished jobs are `interrupted` on the next start, never a live server's: while one
    runs, a second `sdlab serve` on its output folder is refused with one line naming the folder."""
    out = tmp_path / "outputs"
    first = start_server(out, "--max-steps", "1000")      # a job that outlasts the refused second server; killed
    try:
        with httpx.Client(base_url=first.url, timeout=60) as client:
            done_id = client.post("/api/jobs", json={"prompt": "kept", "steps": 2, "seed": 4}).json()["id"]
            done = _wait_status(client, done_id, ("done",))
            running_id = client.post("/api/jobs", json={**LONG, "steps": 1000}).json()["id"]
            queued_id = client.post("/api/jobs", json=LONG).json()["id"]
            _wait_status(client, running_id, ("running",))
            other = subprocess.run([sys.executable, "-m", "sdlab", "serve", "--port", str(free_port()),
                                    "--output-dir", str(out)], capture_output=True, text=True, env=server_env(),
                                   timeout=120)         # a second server on the folder would mark its jobs interrupted
            assert (other.returncode, other.stderr) == (2, f"sdlab: error: the output folder {out} is in use by "
                                                           f"another sdlab serve (process {first.process.pid}); stop "
                                                           "it, or give this server another --output-dir\n")
            assert [client.get(f"/api/jobs/{i}").json()["status"] for i in (running_id, queued_id)] == ["running", "queued"]
    finally:
        first.kill()                                     # no chance to clean up
    second = start_server(out)
    try:
        with httpx.Client(base_url=second.url, timeout=60) as client:
            jobs = {job["id"]: job for job in client.get("/api/jobs").json()["jobs"]}
            assert jobs[done_id]["status"] == "done" and jobs[done_id]["images"] == done["images"]
            assert jobs[done_id]["request"]["seed"] == 4 and jobs[done_id]["infotexts"] == done["infotexts"]
            assert client.get(done["images"][0]).status_code == 200
            for job_id in (running_id, queued_id):
                job = client.get(f"/api/jobs/{job_id}").json()
                assert job["status"] == "interrupted" and "stopped" in job["error"] and job["images"] == []
            assert client.delete(f"/api/jobs/{running_id}").json()["status"] == "interrupted"
            with client.stream("GET", f"/api/jobs/{running_id}/events") as stream:
                lines = [line for line in stream.iter_lines() if line]
            assert lines[0] == "event: failed" and "interrupted" in lines[1]
            new_id = client.post("/api/jobs", json={"prompt": "after", "steps": 2}).json()["id"]
            assert _wait_status(client, new_id, ("done",))["status"] == "done"
            assert [j["id"] for j in client.get("/api/jobs").json()["jobs"]][:1] == [new_id]
    finally:
        second.stop()


def test_sigterm_stops_the_server_without_an_error_line(tmp_path):
    """systemd / docker stop a server with SIGTERM: uvicorn shuts down, then sdlab exits 143 saying it stopped."""
    server = start_server(tmp_path / "outputs")
    server.stop()
    assert server.process.returncode == 143
    assert "sdlab serve: stopped" in server.output() and "error" not in server.output()


def test_sigterm_answers_waiting_a1111_calls_and_records_the_running_job_interrupted(tmp_path):
    """Stopping ends the jobs first: each A1111 call waiting on one gets A1111's error body with a 503 (no
    traceback in the log), and the job running then is recorded `interrupted`, as a queued one, not as a
    client's cancel."""
    out = tmp_path / "outputs"
    server = start_server(out, "--max-steps", "1000")           # a job that outlasts what comes before the stop
    answers: list[httpx.Response] = []

    def wait_on_txt2img() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            answers.append(client.post("/sdapi/v1/txt2img", json={"prompt": "waits", "steps": 2}))

    waiters = [threading.Thread(target=wait_on_txt2img) for _ in range(2)]
    with httpx.Client(base_url=server.url, timeout=60) as client:
        running_id = client.post("/api/jobs", json={**LONG, "steps": 1000}).json()["id"]
        _wait_status(client, running_id, ("running",))
        for waiter in waiters:
            waiter.start()
        deadline = time.monotonic() + 120
        while sum(job["status"] == "queued" for job in client.get("/api/jobs").json()["jobs"]) < len(waiters):
            assert time.monotonic() < deadline, "the A1111 calls were never queued"
            time.sleep(0.05)
    server.stop()
    for waiter in waiters:
        waiter.join()
    assert server.process.returncode == 143
    for answer in answers:
        assert answer.status_code == 503
        assert answer.json() == {"error": "HTTPException", "detail": "Service Unavailable", "body": "",
                                 "errors": "the server stopped before this job finished"}
    assert "Traceback" not in server.output() and "ERROR" not in server.output()
    second = start_server(out)
    try:
        with httpx.Client(base_url=second.url, timeout=60) as client:
            job = client.get(f"/api/jobs/{running_id}").json()
            assert job["status"] == "interrupted" and job["error"] == "the server stopped before this job finished"
            with client.stream("GET", f"/api/jobs/{running_id}/events") as stream:
                assert [line for line in stream.iter_lines() if line][0] == "event: failed"
    finally:
        second.stop()


def test_an_unusable_job_history_is_a_one_line_error_naming_it(tmp_path):
    out = tmp_path / "outputs"
    (out / "sdlab-server.sqlite").mkdir(parents=True)
    result = subprocess.run([sys.executable, "-m", "sdlab", "serve", "--port", str(free_port()), "--output-dir",
                             str(out)], capture_output=True, text=True, env=server_env(), timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"sdlab: error: cannot open the job history {out / 'sdlab-server.sqlite'}: ")


def test_binding_beyond_loopback_without_auth_is_refused():
    result = subprocess.run([sys.executable, "-m", "sdlab", "serve", "--host", "0.0.0.0", "--port", str(free_port())],
                            capture_output=True, text=True, env=server_env(), timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("sdlab: error: refusing to listen on 0.0.0.0 without authentication")
    assert "--auth" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--auth", "nopassword"], "--auth wants USER:PASS"),
    (["--token-file", "/no/such/token"], "cannot read --token-file"),
    (["--model", "/no/such/model.safetensors"], "does not exist"),
    (["--max-steps", "0"], "--max-steps must be positive"),
    (["--allowed-hosts", "tunnel.example:8080"], "--allowed-hosts takes host names without ports"),
])
def test_bad_serve_options_are_one_line_errors(args, message):
    result = subprocess.run([sys.executable, "-m", "sdlab", "serve", "--port", str(free_port()), *args],
                            capture_output=True, text=True, env=server_env(), timeout=120)
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1


def test_token_auth_guards_every_route_and_the_body_limit(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    good = {"Authorization": "Bearer s3cret-token"}
    server = start_server(tmp_path / "outputs", "--token-file", str(token_file), "--max-body-mb", "0.01",
                          headers=good)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for path in ("/", "/static/index.html", "/sdapi/v1/options", "/api/jobs", "/api/images/x.png", "/docs"):
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + base64.b64encode(b"a:b").decode()}):
                    response = client.get(path, headers=headers)
                    assert response.status_code == 401, (path, headers)
                    # a token alone: no Basic challenge, whose password prompt no password satisfies
                    assert response.headers["www-authenticate"] == 'Bearer realm="sdlab"'
            assert client.get("/", headers=good).status_code == 200
            assert client.get("/sdapi/v1/sd-models", headers=good).status_code == 200
            # behind auth any Host name is answered (a server reached by its LAN name, a proxy's)
            assert client.get("/sdapi/v1/sd-models", headers={**good, "Host": "lan-name.example"}).status_code == 200
            # and any page's Origin: a browser never sends a token unasked, so no other site's form can carry it
            assert client.post("/sdapi/v1/interrupt", headers={**good, "Origin": "https://evil.example"}).status_code == 200
            big = {"prompt": "x" * 20_000}
            assert client.post("/api/jobs", json=big, headers=good).status_code == 413

            def chunks():
                yield b'{"prompt": "'
                for _ in range(30):
                    yield b"y" * 1000
                yield b'"}'

            streamed = client.post("/api/jobs", content=chunks(), headers={**good, "content-type": "application/json"})
            assert streamed.status_code == 413
            created = client.post("/api/jobs", json={"prompt": "small", "steps": 2}, headers=good)
            assert created.status_code == 202
    finally:
        server.stop()


def _without_host_header(url: str, path: str) -> bytes:
    """The raw answer to an HTTP/1.0 GET of `path` that sends no Host header (non-browser clients may not)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        return b"".join(iter(lambda: sock.recv(65536), b""))


def test_a_loopback_server_without_auth_answers_only_loopback_host_names(tmp_path):
    """DNS rebinding: a web page on rebind.evil.example, whose name then resolves to 127.0.0.1, reaches the server
    with that Host, so it is refused (403, one line) on every route; localhost, 127.0.0.1 and [::1] with any port
    (the web UI, webuiapi, an SSH tunnel's local end) and the --allowed-hosts names are answered, each with or
    without one trailing dot (the fully qualified name a browser sends as typed: `localhost.` was a 403, and
    `--allowed-hosts NAME.` answered only `NAME.`)."""
    server = start_server(tmp_path / "outputs", "--allowed-hosts", "Tunnel.Example, other.example.")
    port = server.url.rsplit(":", 1)[1]
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for host in ("rebind.evil.example", f"rebind.evil.example:{port}", f"0.0.0.0:{port}", "127.0.0.1.nip.io",
                         f"localhost.evil.example:{port}", "tunnel.example.evil", "[::2]", "evil:80:1",
                         f"localhost..:{port}", ".", "evil.example."):
                for method, path in (("GET", "/"), ("GET", "/sdapi/v1/cmd-flags"), ("GET", "/api/jobs"),
                                     ("POST", "/sdapi/v1/interrupt"), ("GET", "/static/index.html")):
                    answer = client.request(method, path, headers={"Host": host})
                    assert answer.status_code == 403, (host, path, answer.text)
                    detail = answer.json()["detail"]
                    assert detail.startswith(f"Host {host!r} refused:") and "--allowed-hosts" in detail
                    assert "\n" not in detail
            for host in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}", "[::1]",
                         f"127.0.0.2:{port}", f"tunnel.example:{port}", "TUNNEL.EXAMPLE", "other.example:9000",
                         f"localhost.:{port}", "LOCALHOST.", f"tunnel.example.:{port}", "other.example.:9000",
                         "other.example"):
                answer = client.get("/sdapi/v1/cmd-flags", headers={"Host": host})
                assert answer.status_code == 200, (host, answer.text)
            assert client.get("/").status_code == 200                      # the web UI, as the browser asks it
            assert _without_host_header(server.url, "/sdapi/v1/options").startswith(b"HTTP/1.1 200")
    finally:
        server.stop()


@pytest.mark.parametrize("given, names", [
    ({"host": "127.0.0.1"}, frozenset()),
    ({"host": "localhost", "allowed_hosts": ("Tunnel.Example",)}, frozenset({"tunnel.example"})),
    ({"host": "localhost", "allowed_hosts": ("MyAlias.", ".")}, frozenset({"myalias"})),     # one trailing dot off
    ({"host": "::1", "allowed_hosts": ("*",)}, None),                  # '*': any name
    ({"host": "127.0.0.1", "basic_auth": ("me", "pw")}, None),         # behind auth any name
    ({"host": "127.0.0.1", "token": "t"}, None),
    ({"host": "0.0.0.0", "token": "t"}, None),
    ({}, None),                     # an app built in-process (not listening: TestClient's Host 'testserver')
])
def test_the_host_names_a_server_answers(tmp_path, given, names):
    from sdlab.server.config import ServerConfig

    assert ServerConfig(output_dir=tmp_path, **given).host_names == names


CROSS_SITE = {"Content-Type": "text/plain"}        # a body a page's form or no-cors fetch sends without a preflight
STATE_CHANGES = (("POST", "/sdapi/v1/interrupt"), ("POST", "/sdapi/v1/skip"), ("POST", "/sdapi/v1/unload-checkpoint"),
                 ("POST", "/api/jobs/0123/interrupt"), ("DELETE", "/api/jobs/0123"), ("PUT", "/api/jobs"),
                 ("PATCH", "/sdapi/v1/options"))


def _refused_origins(client: httpx.Client, port: str) -> None:
    """Every state-changing route is a 403 naming the Origin for pages of other sites, of another port of this
    machine, of a name that only starts like an allowed one and of no origin ("null": a sandboxed frame)."""
    for origin in ("https://evil.example", f"http://evil.example:{port}", "http://localhost:3000",
                   f"http://127.0.0.1:{int(port) + 1}", f"https://127.0.0.1:{port}.evil.example", "null",
                   "https://tunnel.example.evil"):
        for method, path in STATE_CHANGES:
            answer = client.request(method, path, content="x", headers={**CROSS_SITE, "Origin": origin})
            assert answer.status_code == 403, (origin, method, path, answer.text)
            detail = answer.json()["detail"]
            assert detail.startswith(f"{method} from a page of {origin!r} refused:"), detail
            assert "--allowed-hosts" in detail and "\n" not in detail


def test_a_page_of_another_origin_cannot_post_to_a_loopback_server_without_auth(tmp_path):
    """Cross-site request forgery: another site's form reaches 127.0.0.1 with the loopback's Host (no DNS rebinding
    needed) and a text/plain POST needs no preflight, so /interrupt, /skip, /unload-checkpoint answered 200 to it.
    Now a POST / PUT / PATCH / DELETE with an Origin is taken only from the server's own origin (the web UI) or a
    name of --allowed-hosts; requests without an Origin (curl, A1111 clients) and GETs are as before."""
    server = start_server(tmp_path / "outputs", "--allowed-hosts", "Tunnel.Example")
    port = server.url.rsplit(":", 1)[1]
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            _refused_origins(client, port)
            for origin, host in ((f"http://127.0.0.1:{port}", None), (f"HTTP://LOCALHOST:{port}", f"localhost:{port}"),
                                 (f"http://[::1]:{port}", f"[::1]:{port}"), ("http://tunnel.example:8080", None),
                                 ("https://tunnel.example", "tunnel.example"), ("http://tunnel.example.:8080", None),
                                 (f"http://localhost.:{port}", f"localhost.:{port}"), (None, None)):
                headers = {**CROSS_SITE, **({} if origin is None else {"Origin": origin}),
                           **({} if host is None else {"Host": host})}
                for path in ("/sdapi/v1/interrupt", "/sdapi/v1/skip", "/sdapi/v1/unload-checkpoint"):
                    assert client.post(path, headers=headers).status_code == 200, (origin, host, path)
            assert client.get("/sdapi/v1/options", headers={"Origin": "https://evil.example"}).status_code == 200
            created = client.post("/api/jobs", json={"prompt": "mine", "steps": 2}, headers={"Origin": server.url})
            assert created.status_code == 202
    finally:
        server.stop()


def test_a_page_of_another_origin_cannot_post_with_the_browsers_basic_credentials(tmp_path):
    """A browser sends the Basic credentials it holds for a server with another site's form too, so behind --auth
    the Origin rule holds as well (on any address: the Host is the name the browser asked for)."""
    auth = ("ada", "lovelace")
    server = start_server(tmp_path / "outputs", "--auth", "ada:lovelace", auth=auth)
    port = server.url.rsplit(":", 1)[1]
    try:
        with httpx.Client(base_url=server.url, timeout=60, auth=auth) as client:
            _refused_origins(client, port)
            lan = {"Host": f"lan-name.example:{port}", "Origin": f"http://lan-name.example:{port}"}
            for headers in ({"Origin": server.url}, lan, {}):
                assert client.post("/sdapi/v1/interrupt", headers={**CROSS_SITE, **headers}).status_code == 200
            assert client.post("/sdapi/v1/interrupt", auth=None, headers={"Origin": server.url}).status_code == 401
    finally:
        server.stop()


@pytest.mark.parametrize("given, names", [
    ({"host": "127.0.0.1"}, frozenset()),
    ({"host": "localhost", "allowed_hosts": ("Tunnel.Example.",)}, frozenset({"tunnel.example"})),
    ({"host": "::1", "allowed_hosts": ("*",)}, None),                  # '*': any page
    ({"host": "127.0.0.1", "basic_auth": ("me", "pw")}, frozenset()),  # the browser sends Basic credentials
    ({"host": "0.0.0.0", "basic_auth": ("me", "pw"), "token": "t"}, frozenset()),
    ({"host": "127.0.0.1", "token": "t"}, None),                       # a token it never sends unasked
    ({}, None),                     # an app built in-process
])
def test_the_origins_whose_pages_may_post(tmp_path, given, names):
    from sdlab.server.config import ServerConfig

    assert ServerConfig(output_dir=tmp_path, **given).origin_names == names
