"""The benchmark's wrk driver, /proc CPU accounting and py-spy summary (benchmarks/wrk.py,
benchmarks/procs.py, benchmarks/profile.py), on real outputs of wrk 4.1.0, Linux and py-spy 0.4."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import h11
import pytest

from benchmarks import procs, profile, wrk

# `wrk -c16 -t2 -d2s` against the demo backend
RATE = """\
Running 2s test @ http://127.0.0.1:42827/sap/opu/odata/x
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.84ms  487.68us  10.56ms   80.69%
    Req/Sec     4.38k   499.92     4.74k    83.33%
  18298 requests in 2.10s, 2.88MB read
Requests/sec:   8709.57
Transfer/sec:      1.37MB
"""

# `wrk -c4 -t1 -d2s --latency` against the demo backend
LATENCY = """\
Running 2s test @ http://127.0.0.1:42827/sap/opu/odata/x
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   506.93us  273.09us   4.46ms   95.73%
    Req/Sec     8.28k     1.09k    9.37k    80.00%
  Latency Distribution
     50%  452.00us
     75%  504.00us
     90%  610.00us
     99%    1.97ms
  16451 requests in 2.00s, 2.59MB read
Requests/sec:   8223.99
Transfer/sec:      1.29MB
"""

# `wrk -c2 -t1 -d1s --latency` against `python3 -m http.server`, for a missing file
NOT_FOUND = """\
Running 1s test @ http://127.0.0.1:18999/nope
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.97ms  497.38us   8.35ms   88.21%
    Req/Sec     1.94k    45.51     1.98k    81.82%
  Latency Distribution
     50%    0.90ms
     75%    1.15ms
     90%    1.37ms
     99%    2.26ms
  2120 requests in 1.10s, 1.05MB read
  Non-2xx or 3xx responses: 2120
Requests/sec:   1927.66
Transfer/sec:      0.96MB
"""

# `wrk -c2 -t1 -d1s` against a server that closes every connection after reading the request
CLOSED = """\
Running 1s test @ http://127.0.0.1:18998/
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.00us    0.00us   0.00us    -nan%
    Req/Sec     0.00      0.00     0.00      -nan%
  0 requests in 1.00s, 0.00B read
  Socket errors: connect 0, read 12503, write 0, timeout 0
Requests/sec:      0.00
Transfer/sec:       0.00B
"""


def test_rate_report_without_latency_distribution() -> None:
    result = wrk.parse_wrk(RATE)
    assert (result.requests, result.seconds, result.requests_per_s) == (18298, 2.1, 8709.57)
    assert result.latency_ms == {} and result.error == ""


def test_latency_distribution_in_ms_whatever_wrk_s_unit() -> None:
    result = wrk.parse_wrk(LATENCY)
    assert result.latency_ms == pytest.approx({50: 0.452, 75: 0.504, 90: 0.610, 99: 1.97})
    assert result.requests == 16451 and result.error == ""


def test_error_pages_void_the_figure() -> None:
    result = wrk.parse_wrk(NOT_FOUND)
    assert result.non_2xx == 2120
    assert result.error == "2120 non-2xx/3xx responses"


def test_socket_errors_and_no_requests_void_the_figure() -> None:
    result = wrk.parse_wrk(CLOSED)
    assert result.socket_errors == {"connect": 0, "read": 12503, "write": 0, "timeout": 0}
    assert result.error == "socket errors read 12503; no request completed"


@pytest.mark.parametrize(
    "output",
    ["unable to connect to 127.0.0.1:1 Connection refused\n", RATE.replace("Requests/sec", "Req/s")],
)
def test_what_is_not_a_report_is_refused(output: str) -> None:
    with pytest.raises(wrk.WrkError, match="not a wrk report"):
        wrk.parse_wrk(output)


@pytest.mark.parametrize(
    ("text", "ms"), [("452.00us", 0.452), ("1.97ms", 1.97), ("2.10s", 2100.0), ("1.00m", 60000.0)]
)
def test_wrk_durations(text: str, ms: float) -> None:
    assert wrk.duration_ms(text) == pytest.approx(ms)


def test_duration_rejects_what_wrk_does_not_print() -> None:
    with pytest.raises(wrk.WrkError):
        wrk.duration_ms("-nan%")


PROXY = {"host": "127.0.0.1", "port": 20003, "proxy_token": "s3cret", "virtual_host": "erp.virtual:8000",
         "location_id": "loc-1"}


def test_through_the_proxy_the_target_is_absolute_and_the_token_is_never_shown() -> None:
    argv = wrk.wrk_argv(PROXY, connections=16, threads=2, seconds=5.0)
    env = wrk.wrk_env(PROXY)
    assert argv[-1] == "http://127.0.0.1:20003/sap/opu/odata/x"  # where wrk connects: the proxy
    assert env == {"BENCH_DELAY_MS": "0", "BENCH_TARGET": "http://erp.virtual:8000/sap/opu/odata/x",
                   "BENCH_HOST": "erp.virtual:8000", "BENCH_PROXY_TOKEN": "s3cret", "BENCH_LOCATION_ID": "loc-1"}
    shown = wrk.shown_command(argv, env)
    assert "s3cret" not in shown and "BENCH_PROXY_TOKEN='<token>'" in shown
    assert "-c16 -t2 -d5s" in shown


def test_direct_path_sets_only_the_pause() -> None:
    assert wrk.wrk_env({"host": "127.0.0.1", "port": 8000}, delay_ms=20.0) == {"BENCH_DELAY_MS": "20"}


def _one_request_server() -> tuple[socket.socket, list[h11.Request], threading.Thread]:
    """A server on port 0 answering 200 to every request with h11, keeping the requests. It serves
    two connections, one after the other: wrk's probe (opened and closed before the test) and
    the test's."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[h11.Request] = []

    def serve() -> None:
        for _ in range(2):
            connection, _ = listener.accept()
            serve_one(connection)

    def serve_one(connection: socket.socket) -> None:
        conn = h11.Connection(h11.SERVER)
        with connection:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    try:
                        data = connection.recv(65536)
                    except ConnectionResetError:  # wrk ends its connections abortively at its deadline
                        return
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    seen.append(event)
                elif isinstance(event, h11.EndOfMessage):
                    connection.sendall(conn.send(h11.Response(status_code=200, headers=[("Content-Length", "2")]))
                                       + conn.send(h11.Data(data=b"ok")) + conn.send(h11.EndOfMessage()))
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, seen, thread


@pytest.mark.skipif(not Path(wrk.WRK).exists(), reason="wrk is not installed")
def test_the_lua_script_sends_what_our_proxy_needs() -> None:
    listener, seen, thread = _one_request_server()
    with listener:
        http = {**PROXY, "port": listener.getsockname()[1]}
        argv = wrk.wrk_argv(http, connections=1, threads=1, seconds=1.0)
        done = subprocess.run(argv, env=wrk.child_env(wrk.wrk_env(http)), capture_output=True, text=True,
                              timeout=30, check=False)
        thread.join(timeout=10)
    assert wrk.parse_wrk(done.stdout).error == ""
    request = seen[0]
    assert request.target == b"http://erp.virtual:8000/sap/opu/odata/x"
    headers = dict(request.headers)
    assert headers[b"host"] == b"erp.virtual:8000"
    assert headers[b"proxy-authorization"] == b"Bearer s3cret"
    assert headers[b"sap-connectivity-scc-location_id"] == b"loc-1"


# --- CPU from /proc/<pid>/stat -----------------------------------------------------------------

# PID 1 of this machine: utime 660, stime 3038, cutime 709589, cstime 143809
INIT = ("1 (process_api) S 0 0 0 0 -1 4194560 190911 92982088 0 8197 660 3038 709589 143809 20 0 13 0 32 "
        "50753536 4616 18446744073709551615 1 1 0 0 0 0 0 4096 1256 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0")
# a copy of sleep named "x) (y": the name holds spaces and parentheses
ODD_NAME = ("18835 (x) (y) S 1 18831 14413 0 -1 4194304 138 0 0 0 0 0 0 0 20 0 1 0 858788 2990080 411 "
            "18446744073709551615 93843993198592 93843993216521 140723441975840 0 0 0 0 6 0 1 0 0 17 1 0 0 0 0 0 "
            "93843993230608 93843993231872 93844708134912 140723441978089 140723441978102 140723441978102 "
            "140723441979373 0")
# python3 after reaping a child that spun 0.3 s: utime 3, stime 1, cutime 9, cstime 25
REAPED = ("18857 (python3) R 18831 18831 14413 0 -1 4194304 2945 6689 6 1 3 1 9 25 20 0 1 0 858819 16961536 3358 "
          "18446744073709551615 94270251630592 94270251630933 140735442802624 0 0 0 0 16781312 2 0 0 0 17 1 0 0 "
          "0 0 0 94270251642288 94270251642904 94270547251200 140735442811136 140735442811179 140735442811179 "
          "140735442812879 0")


def test_cpu_ticks_count_own_and_reaped_children_time() -> None:
    assert procs.stat_cpu_ticks(INIT) == 660 + 3038 + 709589 + 143809
    assert procs.stat_cpu_ticks(REAPED) == 3 + 1 + 9 + 25


def test_cpu_ticks_of_a_process_whose_name_has_spaces_and_parentheses() -> None:
    assert procs.stat_cpu_ticks(ODD_NAME) == 0
    assert procs.stat_cpu_ticks(ODD_NAME.replace(" 0 0 0 0 20 0 1", " 7 5 0 0 20 0 1")) == 12


@pytest.mark.parametrize("line", ["", "Name: python3", "1 (init) S 0 0"])
def test_cpu_ticks_refuse_what_is_not_a_stat_line(line: str) -> None:
    with pytest.raises(ValueError, match="not a /proc"):
        procs.stat_cpu_ticks(line)


def test_cpu_seconds_of_a_tree_keep_the_time_of_a_child_that_ended() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time\ninput()\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.3: pass"],
                             stdin=subprocess.PIPE, text=True)
    try:
        before = procs.cpu_seconds(os.getpid())  # the child waits for its line, spending nothing
        child.communicate("\n", timeout=30)  # it spins 0.3 s, exits and is reaped
        assert procs.cpu_seconds(os.getpid()) - before >= 0.25
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


# --- py-spy summary ------------------------------------------------------------------------------

V = "/work/main/.venv/lib/python3.11/site-packages"
TOP = ("_run_module_as_main (<frozen runpy>);_run_code (<frozen runpy>);<module> (/w/connector/__main__.py);"
       "main (/w/connector/cli.py);cmd_cloud (/w/connector/cli.py);"
       f"run ({V}/trio/_core/_run.py)")
# five lines of a real `py-spy record --format raw --full-filenames --nolineno` of the cloud process
RAW = f"""\
{TOP};unrolled_run ({V}/trio/_core/_run.py) 14
{TOP};EpollIOManager.get_events ({V}/trio/_core/_io_epoll.py) 177
{TOP};unrolled_run ({V}/trio/_core/_run.py);_run_handler ({V}/trio/_highlevel_serve_listeners.py);\
AdminServer._serve (/w/connector/admin.py);_send (/w/connector/admin.py);\
SocketStream.send_all ({V}/trio/_highlevel_socket.py);\
_make_simple_sock_method_wrapper.<locals>.wrapper ({V}/trio/_socket.py);\
_SocketType._nonblocking_helper ({V}/trio/_socket.py) 9
{TOP};unrolled_run ({V}/trio/_core/_run.py);_serve_one_listener ({V}/trio/_highlevel_serve_listeners.py);\
SocketListener.accept ({V}/trio/_highlevel_socket.py);_SocketType.accept ({V}/trio/_socket.py);\
_make_simple_sock_method_wrapper.<locals>.wrapper ({V}/trio/_socket.py);\
_SocketType._nonblocking_helper ({V}/trio/_socket.py);socket.accept (/usr/lib/python3.11/socket.py) 2
{TOP};unrolled_run ({V}/trio/_core/_run.py);_run_handler ({V}/trio/_highlevel_serve_listeners.py);\
ProxyService._serve_client (/w/connector/cloud/router.py);HttpProxy._handle (/w/connector/cloud/proxy.py);\
_ProxyConnection.serve (/w/connector/cloud/proxy.py);_ProxyConnection._next_request_event (/w/connector/cloud/proxy.py);\
Connection.next_event ({V}/h11/_connection.py);ReceiveBuffer.maybe_extract_lines ({V}/h11/_receivebuffer.py) 22
"""


def test_profile_summary_self_cumulative_and_areas() -> None:
    summary = profile.summarize(RAW, top=3)
    assert summary.samples == 224
    assert summary.self_samples == [
        ("trio/_core/_io_epoll.py:EpollIOManager.get_events", 177),
        ("h11/_receivebuffer.py:ReceiveBuffer.maybe_extract_lines", 22),
        ("trio/_core/_run.py:unrolled_run", 14),
    ]
    cumulative = dict(profile.summarize(RAW, top=100).cumulative_samples)
    assert cumulative == {  # ours only, below the entry points
        "connector/admin.py:AdminServer._serve": 9,
        "connector/admin.py:_send": 9,
        "connector/cloud/router.py:ProxyService._serve_client": 22,
        "connector/cloud/proxy.py:HttpProxy._handle": 22,
        "connector/cloud/proxy.py:_ProxyConnection.serve": 22,
        "connector/cloud/proxy.py:_ProxyConnection._next_request_event": 22,
    }
    assert summary.area_samples == [("trio", 200), ("h11", 22), ("socket", 2)]
    assert summary.area_cumulative["trio"] == 224  # every sample runs under trio.run
    assert summary.area_cumulative["connector.cloud.proxy"] == 22
    assert summary.area_cumulative["socket"] == 2


@pytest.mark.parametrize(
    ("filename", "area"),
    [
        (f"{V}/h11/_readers.py", "h11"),
        ("/usr/lib/python3.11/ssl.py", "ssl"),
        ("/usr/lib/python3.11/json/encoder.py", "json"),
        ("/work/wt/bench/connector/cloud/proxy.py", "connector.cloud.proxy"),
        ("<frozen runpy>", "<frozen runpy>"),
    ],
)
def test_areas(filename: str, area: str) -> None:
    assert profile.area(filename) == area


def test_profile_counts_a_sample_whose_stack_was_not_read() -> None:
    summary = profile.summarize(RAW + " 15\n", top=100)  # as py-spy --nonblocking writes it
    assert summary.samples == 224 + 15
    assert ("(stack not read)", 15) in summary.self_samples and ("(stack not read)", 15) in summary.area_samples


def test_profile_refuses_a_line_without_a_count() -> None:
    with pytest.raises(ValueError, match="collapsed-stack"):
        profile.summarize("main (x.py);f (x.py)\n")


def test_profile_render_shares() -> None:
    lines = profile.render("cloud", profile.summarize(RAW, top=2), 10.0, 100)
    assert lines[0] == "#### cloud: 224 samples in 10 s at 200 Hz (≈ 1.1 s of CPU, about 11200 µs per request)"
    assert "| trio | 89% | 100% |" in lines
    rows = [line for line in lines if line.startswith("| `")]
    assert rows[0].startswith("| `trio/_core/_io_epoll.py:EpollIOManager.get_events` | 79.0% | `")
    assert rows[0].endswith("| `connector/cloud/proxy.py:HttpProxy._handle` | 10% |") and len(rows) == 2
