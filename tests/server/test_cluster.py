"""Scale-out on Ray Serve (server/cluster.py) on a local Ray cluster: two replicas of the demo model behind Ray
Serve's proxy, one expert store on a local directory or on a real S3 API (moto's server on loopback, s3fs).

Select with `-m cluster`; they run by default. A module-scoped Ray instance; one deployment per store.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import ray  # a dev dependency: without it these tests fail rather than skip, so CI always runs them
from ray import serve

from server.expert_store import ExpertStore, Manifest, ManifestEntry
from server.served_experts import VERSION_HEADER
from server.settings import DEMO_EXPERTS_DIR, ClusterSettings, Settings
from tests.server.conftest import free_port

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]

POLL_S = 1.0
MATH = (DEMO_EXPERTS_DIR / "math.safetensors").read_bytes()
CODE = (DEMO_EXPERTS_DIR / "code.safetensors").read_bytes()
MATH_PROMPT = "Question: Tom has 5 apples and buys 3 more. How many apples does Tom have now?\nAnswer:"
CODE_PROMPT = "def total_prices(prices):\n"
PROMPTS = [MATH_PROMPT, "The otter is", CODE_PROMPT]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_serve() -> Iterator[str]:
    """A local Ray instance with Ray Serve's proxy on a free loopback port; yields the proxy's URL."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # logical CPUs: two replicas at 1 CPU each, and room for a replacement while a killed one is torn down
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@dataclass
class Cluster:
    proxy: str
    store: ExpertStore
    app_name: str

    def replicas(self) -> list[dict]:
        from server.cluster import replica_states

        return asyncio.run(replica_states(self.app_name))


@pytest.fixture(scope="module", params=["local", "s3"])
def cluster(request: pytest.FixtureRequest, ray_serve: str, tmp_path_factory) -> Iterator[Cluster]:
    """Two replicas of the demo model following one store whose version 1 is [math]."""
    from server.cluster import build_application

    if request.param == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="plugmoe-cluster")
        # credentials in the options: the Ray workers started before the fixture set AWS_* in this process
        options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        url = "s3://plugmoe-cluster/experts"
    else:
        url, options = str(tmp_path_factory.mktemp("cluster") / "experts"), {}
    store = ExpertStore(url, options).open()
    math = store.put_blob(MATH)
    store.commit(Manifest(0), (ManifestEntry("math", math.sha256, math.size),))

    settings = Settings(
        device="cpu",
        expert_store=url,
        expert_store_options=json.dumps(options) if options else None,
        poll_interval_s=POLL_S,
        max_false_positive_rate=-1,
        max_steal_rate=-1,
        log_level="warning",
    )
    app_name = f"plugmoe-{request.param}"
    cluster_settings = ClusterSettings(
        num_replicas=2,
        num_cpus=1,
        # a plug answers once every replica serves the new set; a replica that lost a same-name race is still in
        # its own admission report (seconds on 2 loaded CPU cores) before its watch applies the winner's set
        plug_wait_s=30 * POLL_S,
        app_name=app_name,
        route_to_current=request.param == "s3",  # one deployment runs with the custom request router
    )
    serve.run(build_application(settings, cluster_settings), name=app_name, route_prefix="/")
    yield Cluster(ray_serve, store, app_name)
    serve.delete(app_name)


class Load:
    """`clients` threads calling /generate through the proxy until stopped (streamed; with `mixed`, every other
    request not streamed); each result is (replica that answered, ok, expert-set version header, finish time).
    `broken` collects the streams that ended with an error event instead of their finish."""

    def __init__(self, base: str, clients: int = 8, mixed: bool = False) -> None:
        self.base, self.stop, self.mixed = base, threading.Event(), mixed
        self.results: list[tuple[str, bool, str, float]] = []
        self.plain: list[tuple[str, bool, str, float]] = []  # the non-streamed requests' results
        self.broken: list[str] = []  # the last event of each stream that ended with an error event
        self.threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(clients)]

    def client(self, i: int) -> None:
        # 30 s: far longer than a 16-token request takes here, short enough that a request the proxy never
        # ends (in flight on a killed replica) fails the client instead of holding the test
        with httpx.Client(base_url=self.base, timeout=30) as client:
            n = 0
            while not self.stop.is_set():
                n += 1
                replica, version, ok = "?", "?", False
                stream = not self.mixed or n % 2 == 0
                body = {"prompt": PROMPTS[(i + n) % 3], "max_new_tokens": 16, "stream": stream}
                try:
                    if not stream:
                        response = client.post("/generate", json=body)
                        replica = response.headers.get("x-plugmoe-replica", "?")
                        version = response.headers.get(VERSION_HEADER, "?")
                        ok = response.status_code == 200 and response.json().get("finish_reason") is not None
                        self.plain.append((replica, ok, version, time.monotonic()))
                        self.results.append((replica, ok, version, time.monotonic()))
                        continue
                    with client.stream("POST", "/generate", json=body) as response:
                        replica = response.headers.get("x-plugmoe-replica", "?")
                        version = response.headers.get(VERSION_HEADER, "?")
                        events = [line for line in response.iter_lines() if line.startswith("data: ")]
                        ok = response.status_code == 200 and '"finish_reason"' in events[-1]
                        if response.status_code == 200 and '"error"' in events[-1]:
                            self.broken.append(events[-1])
                except (httpx.HTTPError, IndexError, ValueError):
                    ok = False
                self.results.append((replica, ok, version, time.monotonic()))

    def failures(self) -> list[tuple]:
        return [r for r in self.results if not r[1]]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(120)


def generate_on_each(proxy: str, replicas: list[dict], prompt: str) -> dict[str, dict]:
    """The answer of every replica to `prompt`, through the proxy (its ports serve metrics and health only):
    requests are sent until each replica has answered one."""
    body = {"prompt": prompt, "max_new_tokens": 4, "routing": {"mode": "sequence"}}
    answers: dict[str, dict] = {}
    for _ in range(60):
        response = httpx.post(f"{proxy}/generate", json=body, timeout=60)
        assert response.status_code == 200, response.text
        answers.setdefault(response.headers["x-plugmoe-replica"], response.json())
        if set(answers) >= {r["replica"] for r in replicas}:
            return answers
    raise AssertionError(f"60 requests reached only {sorted(answers)}")


def test_a_plug_under_load_reaches_every_replica(cluster: Cluster) -> None:
    """8 clients stream through the proxy; `code` is plugged through the proxy: the answer comes once both
    replicas serve the new version (201 within the plug's wait of 2 poll intervals), each replica (asked
    directly) serves it and routes code to it, and no request fails."""
    before = cluster.replicas()
    assert len(before) == 2 and [r["version"] for r in before] == [1, 1], before
    with Load(cluster.proxy) as load:
        time.sleep(2)
        response = httpx.post(f"{cluster.proxy}/experts", files={"file": ("code.safetensors", CODE)}, timeout=120)
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["name"] == "code" and body["version"] == 2 and body["converged"] is True
        assert sorted(r["replica"] for r in body["replicas"]) == sorted(r["replica"] for r in before)
        assert response.headers[VERSION_HEADER] == "2"
        replicas = cluster.replicas()
        for replica in replicas:  # each replica, asked on its actor
            assert replica["version"] == 2 and replica["experts"] == ["math", "code"], replica
        assert all(a["experts"]["code"] == 1.0 for a in generate_on_each(cluster.proxy, replicas, CODE_PROMPT).values())
        assert all(a["experts"]["math"] == 1.0 for a in generate_on_each(cluster.proxy, replicas, MATH_PROMPT).values())
        time.sleep(1)
    assert len(load.results) >= 16 and not load.failures(), load.failures()[:5]
    assert {r[0] for r in load.results} == {r["replica"] for r in before}  # the load was split
    assert cluster.store.current().names == ("math", "code")


def test_same_name_plugs_through_two_replicas(cluster: Cluster) -> None:
    """Two plugs of one name at once through the proxy (each lands on either replica: the store's
    compare-and-swap decides across replicas, the replica's lock within one)."""
    replicas = cluster.replicas()
    answers: list[httpx.Response] = []
    barrier = threading.Barrier(len(replicas))

    def plug(replica: dict) -> None:
        barrier.wait()
        files = {"file": ("math.safetensors", MATH)}
        answers.append(httpx.post(f"{cluster.proxy}/experts", files=files, data={"name": "twin"}, timeout=120))

    threads = [threading.Thread(target=plug, args=(r,)) for r in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(a.status_code for a in answers) == [201, 409], [a.text for a in answers]
    lost = next(a for a in answers if a.status_code == 409)
    assert "already plugged" in lost.json()["detail"]
    manifest = cluster.store.current()  # parses and checks: versions, unique names, hashes in hex
    assert manifest.names.count("twin") == 1
    for entry in manifest.experts:
        cluster.store.read_blob(entry.sha256)  # every file it names is complete
    assert all(r["version"] == manifest.version and "twin" in r["experts"] for r in cluster.replicas())
    response = httpx.delete(f"{cluster.proxy}/experts/twin", timeout=120)
    assert response.status_code == 200 and response.json()["converged"] is True
    assert all("twin" not in r["experts"] for r in cluster.replicas())


def test_metrics_of_every_replica_reach_prometheus(cluster: Cluster) -> None:
    replicas = cluster.replicas()
    version = cluster.store.current().version
    targets = httpx.get(f"{cluster.proxy}/cluster/sd", timeout=30).json()
    assert sorted(t["labels"]["replica"] for t in targets) == sorted(r["replica"] for r in replicas)
    for target in targets:
        own = httpx.get(f"http://{target['targets'][0]}/metrics", timeout=30).text
        assert f"plugmoe_expert_set_version {float(version)}" in own
    merged = httpx.get(f"{cluster.proxy}/cluster/metrics", timeout=30).text
    lines = [line for line in merged.splitlines() if line.startswith("plugmoe_expert_set_version{")]
    assert sorted(lines) == sorted(
        f'plugmoe_expert_set_version{{replica="{r["replica"]}"}} {float(version)}' for r in replicas
    )
    assert merged.count("# TYPE plugmoe_requests_total counter") == 1  # each metric's header once
    from tests.integration.test_prometheus import PROMTOOL

    if PROMTOOL is not None:  # Prometheus's own parser reads it (its lint notes about names are not the point)
        checked = subprocess.run([PROMTOOL, "check", "metrics"], input=merged, capture_output=True, text=True)
        assert "error" not in (checked.stdout + checked.stderr).lower(), checked.stdout + checked.stderr
    status = httpx.get(f"{cluster.proxy}/cluster/versions/{version}", timeout=30).json()
    assert status["converged"] is True and len(status["replicas"]) == 2


@pytest.mark.parametrize("cluster", ["local"], indirect=True)  # the scraping does not depend on the store
def test_prometheus_scrapes_every_replica_and_the_dashboard_sums_them(cluster: Cluster, tmp_path: Path) -> None:
    """A real Prometheus finds the replicas through /cluster/sd (deploy/prometheus-cluster.yml's way), scrapes
    each one's own /metrics with its replica label, and the dashboard's sums cover every replica."""
    from tests.integration.test_prometheus import DASHBOARD, PROMETHEUS, dashboard_exprs, query, substitute, wait_for

    if PROMETHEUS is None:
        pytest.skip("needs the prometheus binary on PATH (apt-get install prometheus)")
    config = yaml_config(cluster.proxy)
    (tmp_path / "prometheus.yml").write_text(config)
    port = free_port()
    command = [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}"]
    command.append(f"--web.listen-address=127.0.0.1:{port}")
    replicas = {r["replica"] for r in cluster.replicas()}
    with open(tmp_path / "prometheus.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    prom = f"http://127.0.0.1:{port}"
    try:
        for _ in range(4):  # traffic through the proxy, split over the replicas
            response = httpx.post(f"{cluster.proxy}/generate", json={"prompt": MATH_PROMPT, "max_new_tokens": 4})
            assert response.status_code == 200
        wait_for(lambda: len(query(prom, 'up{job="plugmoe"} == 1')["result"]) == 2, 60, "both replicas scraped")
        versions = query(prom, "plugmoe_expert_set_version")["result"]
        assert {v["metric"]["replica"] for v in versions} == replicas
        assert {v["value"][1] for v in versions} == {str(cluster.store.current().version)}
        per_replica = query(prom, 'sum by (replica) (plugmoe_requests_total{endpoint="/generate"})')["result"]
        total = query(prom, 'sum(plugmoe_requests_total{endpoint="/generate"})')["result"]
        assert float(total[0]["value"][1]) == sum(float(r["value"][1]) for r in per_replica) > 0
        dashboard = json.loads(DASHBOARD.read_text())
        lagging = next(e for e in dashboard_exprs(dashboard) if "scalar(max(plugmoe_expert_set_version))" in e)
        assert query(prom, substitute(lagging, dashboard))["result"][0]["value"][1] == "0"  # none behind
        plugged = query(prom, substitute("max(plugmoe_experts_plugged)", dashboard))["result"]
        assert plugged[0]["value"][1] == str(len(cluster.store.current().names))
    finally:
        process.terminate()
        process.wait(10)


def yaml_config(proxy: str) -> str:
    """deploy/prometheus-cluster.yml with the test's proxy and 1 s intervals."""
    text = (REPO / "deploy" / "prometheus-cluster.yml").read_text()
    text = text.replace("http://127.0.0.1:8000/cluster/sd", f"{proxy}/cluster/sd")
    for interval in ("scrape_interval: 5s", "evaluation_interval: 5s", "refresh_interval: 15s"):
        text = text.replace(interval, interval.split(":")[0] + ": 1s")
    return text


@pytest.mark.parametrize("cluster", ["local"], indirect=True)  # the start gate does not depend on the store
def test_a_killed_replica_is_replaced_with_the_current_set_before_it_takes_traffic(cluster: Cluster) -> None:
    current = cluster.store.current().version
    victim, survivor = cluster.replicas()
    with Load(cluster.proxy) as load:
        time.sleep(2)
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)
        deadline = killed_at + 180
        while True:
            fresh = [r for r in cluster.replicas() if r["replica"] not in (victim["replica"], survivor["replica"])]
            if fresh:
                break
            assert time.monotonic() < deadline, "no replacement replica within 180 s"
            time.sleep(0.1)
        replacement = fresh[0]
        # RUNNING (visible to the proxy) only once it serves the current set
        assert replacement["version"] == current and replacement["experts"] == list(cluster.store.current().names)
        wait_for_traffic = time.monotonic() + 60
        while not any(r[0] == replacement["replica"] for r in load.results) and time.monotonic() < wait_for_traffic:
            time.sleep(0.2)
    on_survivor = [r for r in load.results if r[0] == survivor["replica"]]
    assert on_survivor and all(ok for _, ok, _, _ in on_survivor)
    on_replacement = [r for r in load.results if r[0] == replacement["replica"]]
    assert on_replacement, "the replacement never took traffic"
    assert all(ok and v == str(current) for _, ok, v, _ in on_replacement)  # never an older set
    failed = {r[0] for r in load.failures()}
    assert failed <= {victim["replica"], "?"}, load.failures()[:5]  # only what was in flight on the victim


@pytest.mark.parametrize("cluster", ["local"], indirect=True)  # the ports do not depend on the store
def test_a_replica_port_serves_metrics_and_health_only(cluster: Cluster) -> None:
    for replica in cluster.replicas():
        url = replica["url"]
        assert httpx.get(f"{url}/metrics", timeout=30).status_code == 200
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        assert httpx.get(f"{url}/ready", timeout=30).json()["status"] == "ready"
        for method, path in (("POST", "/generate"), ("POST", "/experts"), ("GET", "/experts"), ("GET", "/docs")):
            refused = httpx.request(method, f"{url}{path}", timeout=30)
            assert refused.status_code == 404 and "proxy" in refused.json()["detail"], (method, path)
    assert httpx.get(f"{cluster.proxy}/experts", timeout=30).status_code == 200, "the API is the proxy's"


@pytest.mark.parametrize("cluster", ["local"], indirect=True)
def test_a_client_that_leaves_a_stream_through_the_ingress_frees_its_sequence(cluster: Cluster) -> None:
    """The ingress relays a client's departure: the replica's generation is cancelled, not run to its end."""

    def cluster_sum(client: httpx.Client, metric: str) -> float:
        lines = client.get("/cluster/metrics").text.splitlines()
        return sum(float(line.split()[-1]) for line in lines if line.startswith(metric + "{"))

    body = {"prompt": "The otter is", "max_new_tokens": 400, "min_new_tokens": 400, "stream": True}  # context: 512
    with httpx.Client(base_url=cluster.proxy, timeout=60) as client:
        before = cluster_sum(client, "plugmoe_generated_tokens_total")
        with client.stream("POST", "/generate", json=body) as response:
            assert response.status_code == 200
            assert any(line.startswith("data: ") for line in response.iter_lines())  # under way; then gone
        deadline = time.monotonic() + 60
        while cluster_sum(client, "plugmoe_running_sequences") > 0:
            assert time.monotonic() < deadline, "the sequence still runs 60 s after its client left"
            time.sleep(0.2)
        generated = cluster_sum(client, "plugmoe_generated_tokens_total") - before
    assert generated < 300, f"{generated} of 400 tokens generated for a client that left after the first"


@pytest.mark.parametrize("cluster", ["local"], indirect=True)
def test_kill_9_of_a_replica_under_load_fails_no_plain_request_and_ends_broken_streams(cluster: Cluster) -> None:
    """The issue's target: kill -9 of one replica under 8-client load (half the requests streamed): 0 failed
    non-streamed requests (each one in flight on the victim is retried on the other replica) and every stream
    cut by the kill ends with an error event."""
    replicas = cluster.replicas()
    victim = replicas[0]
    with Load(cluster.proxy, mixed=True) as load:
        time.sleep(3)
        in_flight_at_kill = len(load.results)
        os.kill(victim["pid"], signal.SIGKILL)
        time.sleep(8)
    streams = [r for r in load.results if r not in load.plain]
    print(  # the figures, with -s
        f"kill -9 under 8 clients: {len(load.plain)} non-streamed requests ({sum(not r[1] for r in load.plain)} "
        f"failed), {len(streams)} streams ({sum(r[1] for r in streams)} finished, {len(load.broken)} ended with an "
        f"error event, {sum(not r[1] for r in streams) - len(load.broken)} otherwise broken)"
    )
    assert len(load.plain) >= 8 and len(load.results) > in_flight_at_kill, "the load ran across the kill"
    assert not [r for r in load.plain if not r[1]], [r for r in load.plain if not r[1]][:5]
    streamed_failures = [r for r in load.results if not r[1] and r not in load.plain]
    assert len(streamed_failures) == len(load.broken), (streamed_failures[:5], load.broken[:5])
    for event in load.broken:  # each names what happened
        assert "ReplicaDiedError" in event and "retry" in event, event
    deadline = time.monotonic() + 180  # Ray Serve replaces the victim (the module's later tests need two)
    while len([r for r in cluster.replicas() if r["replica"] != victim["replica"]]) < 2:
        assert time.monotonic() < deadline, "no replacement replica within 180 s"
        time.sleep(0.5)


# --- without a Ray cluster ---------------------------------------------------------------------------------


@dataclass
class StandInReplica:
    """What CurrentSetRouter reads of a ray.serve.request_router.RunningReplica."""

    replica_id: str
    routing_stats: dict | None


def test_promtool_accepts_the_cluster_config() -> None:
    from tests.integration.test_prometheus import PROMTOOL

    if PROMTOOL is None:
        pytest.skip("needs promtool on PATH (apt-get install prometheus)")
    config = REPO / "deploy" / "prometheus-cluster.yml"
    result = subprocess.run([PROMTOOL, "check", "config", str(config)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_kuberay_manifest_is_a_valid_serve_config_for_the_app_builder() -> None:
    """deploy/kuberay-rayservice.yaml cannot run here (no Kubernetes); its serveConfigV2 is checked against Ray
    Serve's own schema, and its args build the application."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from server.cluster import app_builder

    service = yaml.safe_load((REPO / "deploy" / "kuberay-rayservice.yaml").read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == __import__("ray").__version__
    (application,) = ServeDeploySchema(**yaml.safe_load(service["spec"]["serveConfigV2"])).applications
    assert application.import_path == "server.cluster:app_builder"
    deployment = replica_deployment(app_builder(dict(application.args)))
    assert deployment.num_replicas == 2 and deployment.ray_actor_options["num_gpus"] == 1
    assert deployment.init_args[0]["expert_store"].startswith("s3://")


def test_a_sample_line_gets_the_replica_label_first() -> None:
    from server.cluster import with_label

    assert with_label("up 1.0", "replica", "a") == 'up{replica="a"} 1.0'
    assert with_label('h_bucket{le="+Inf"} 3', "replica", "a") == 'h_bucket{replica="a",le="+Inf"} 3'
    assert with_label('x{y="{b} c"} 2 17', "replica", 'q"') == 'x{replica="q\\"",y="{b} c"} 2 17'
    assert with_label("e{} 0", "replica", "a") == 'e{replica="a"} 0'


def test_current_set_router_routes_to_replicas_on_the_newest_version() -> None:
    from server.cluster import CurrentSetRouter

    router = object.__new__(CurrentSetRouter)  # choose_replicas reads nothing of the router's state

    def choose(*replicas: StandInReplica) -> set[str]:
        chosen = asyncio.run(router.choose_replicas(list(replicas)))
        return {r.replica_id for r in chosen[0]}

    current, lagging, starting = (
        StandInReplica("a", {"version": 5}),
        StandInReplica("b", {"version": 4}),
        StandInReplica("c", None),
    )
    assert choose(current, lagging) == {"a"}
    assert choose(current, lagging, starting) == {"a", "c"}  # no stats yet: it plugged the set before RUNNING
    assert choose(lagging, StandInReplica("d", {"version": 4})) == {"b", "d"}
    assert choose(StandInReplica("e", {}), StandInReplica("f", {})) == {"e", "f"}


def test_the_application_carries_settings_and_cluster_options() -> None:
    from server.cluster import app_builder

    fixed = replica_deployment(app_builder({"num_replicas": 3, "num_cpus": 2, "device": "cpu", "max_queue": 10}))
    settings, cluster = fixed.init_args
    assert settings == {"device": "cpu", "max_queue": 10, "num_threads": 2}  # only what was set, plus threads
    assert cluster["num_replicas"] == 3 and fixed.num_replicas == 3
    assert fixed.ray_actor_options == {"num_cpus": 2.0, "num_gpus": 0.0}
    assert fixed.max_ongoing_requests == 16 + 10  # a batch plus plugmoe's own queue
    assert fixed._deployment_config.autoscaling_config is None
    assert fixed._deployment_config.request_router_config.request_router_class != "server.cluster:CurrentSetRouter"

    scaled = replica_deployment(app_builder({"num_replicas": 2, "max_replicas": 6, "route_to_current": True}))
    autoscaling = scaled._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.target_ongoing_requests) == (2, 6, 8)
    router = scaled._deployment_config.request_router_config
    assert router.request_router_class == "server.cluster:CurrentSetRouter"
    with pytest.raises(ValueError, match="unknown settings \\['replicas'\\]"):
        app_builder({"replicas": 2})


def replica_deployment(application):
    """The replicas' deployment of the application app_builder builds (its root is the ingress)."""
    from server.cluster import DEPLOYMENT, INGRESS

    ingress = application._bound_deployment
    assert ingress.name == INGRESS and ingress.ray_actor_options["num_cpus"] == 0
    replicas = ingress.init_args[0]._bound_deployment
    assert replicas.name == DEPLOYMENT
    return replicas


def test_the_ingress_takes_the_settings_and_the_replicas() -> None:
    from server.cluster import app_builder

    ingress = app_builder({"num_replicas": 2, "max_body_bytes": 1024, "api_keys": "k"})._bound_deployment
    replicas, settings = ingress.init_args
    assert settings == {"max_body_bytes": 1024, "api_keys": "k", "num_threads": 1}  # its guard's limits
    assert replicas._bound_deployment.init_args[0] == settings


# --- the ingress's relay, with scripted replicas (no Ray cluster) --------------------------------------------

START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
SSE_START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}


def _body(data: bytes, more: bool = False) -> dict:
    return {"type": "http.response.body", "body": data, "more_body": more}


class ScriptedReplicas:
    """Stands in for the replicas' DeploymentHandle: each forward call plays the next script (a list of ASGI
    messages; an exception in it is raised there, as a replica that dies raises ActorDiedError)."""

    def __init__(self, *scripts: list) -> None:
        self.scripts, self.calls = list(scripts), []
        self.forward = self

    def options(self, stream: bool) -> ScriptedReplicas:
        assert stream
        return self

    def remote(self, scope: dict, body: bytes) -> ScriptedReplies:
        self.calls.append((scope["method"], scope["path"], body))
        return ScriptedReplies(self.scripts.pop(0))


class ScriptedReplies:
    def __init__(self, script: list) -> None:
        self.script, self.cancelled = script, False

    def __aiter__(self) -> ScriptedReplies:
        return self

    async def __anext__(self) -> dict:
        if not self.script:
            raise StopAsyncIteration
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True


def _relay(replicas: ScriptedReplicas, method: str, path: str, body: bytes = b"{}", **settings) -> tuple:
    """(status, headers, body) of the ingress's answer to one request."""
    from starlette.requests import Request

    from server.cluster import ForwardToReplicas

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
        "scheme": "http",
        "http_version": "1.1",
    }

    read = []

    async def receive() -> dict:
        if read:  # the client stays: a response waits for a disconnect that never comes
            await asyncio.Event().wait()
        read.append(True)
        return {"type": "http.request", "body": body, "more_body": False}

    async def run() -> tuple:
        response = await ForwardToReplicas(replicas, Settings(**settings)).answer(Request(scope, receive))
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        await response(scope, receive, send)
        data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return sent[0]["status"], dict(sent[0]["headers"]), data

    return asyncio.run(run())


def test_a_request_whose_replica_dies_before_answering_is_retried() -> None:
    died = ray.exceptions.ActorDiedError()
    replicas = ScriptedReplicas([START, died], [died], [START, _body(b'{"text": "ok"}')])
    status, headers, body = _relay(replicas, "POST", "/generate", b'{"prompt": "x"}')
    assert (status, body) == (200, b'{"text": "ok"}') and headers[b"content-type"] == b"application/json"
    assert replicas.calls == [("POST", "/generate", b'{"prompt": "x"}')] * 3


def test_a_stream_whose_replica_dies_mid_answer_ends_with_an_error_event() -> None:
    died = ray.exceptions.ActorDiedError()
    for path, last in (("/generate", b"}}\n\n"), ("/v1/completions", b"data: [DONE]\n\n")):
        replicas = ScriptedReplicas([SSE_START, _body(b'data: {"text": "a"}\n\n', more=True), died])
        status, _, body = _relay(replicas, "POST", path)
        events = body.decode().strip().split("\n\n")
        assert status == 200 and events[0] == 'data: {"text": "a"}' and body.endswith(last), body
        assert json.loads(events[1].removeprefix("data: "))["error"]["type"] == "ReplicaDiedError"
        assert len(replicas.calls) == 1, "a stream under way is never replayed"


def test_a_stream_that_ends_without_its_last_byte_gets_the_error_event_too() -> None:
    replicas = ScriptedReplicas([SSE_START, _body(b'data: {"text": "a"}\n\n', more=True)])
    _, _, body = _relay(replicas, "POST", "/generate")
    assert b"ReplicaDiedError" in body


def test_plugs_are_not_retried_and_every_try_failing_is_503() -> None:
    died = ray.exceptions.ActorDiedError()
    replicas = ScriptedReplicas([died])
    status, headers, body = _relay(replicas, "POST", "/experts")
    assert status == 503 and len(replicas.calls) == 1 and json.loads(body)["error"]["type"] == "ReplicaDiedError"
    replicas = ScriptedReplicas(*[[died] for _ in range(4)])
    status, headers, body = _relay(replicas, "GET", "/experts")
    assert status == 503 and len(replicas.calls) == 4 and headers[b"retry-after"] == b"1"
    assert "retry the request" in json.loads(body)["detail"]


def test_the_ingress_applies_the_apps_guard_before_relaying() -> None:
    replicas = ScriptedReplicas()
    status, _, body = _relay(replicas, "POST", "/generate", api_keys="k1")
    assert status == 401 and replicas.calls == []
    status, _, _ = _relay(replicas, "POST", "/generate", b"x" * 2048, max_body_bytes=1024)
    assert status == 413 and replicas.calls == []


def test_a_replica_port_refuses_everything_but_metrics_and_health() -> None:
    from fastapi.testclient import TestClient

    from server.cluster import DirectPathsOnly

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"app"})

    client = TestClient(DirectPathsOnly(app))  # no lifespan: the replica's app runs its own
    assert [client.get(p).text for p in ("/metrics", "/health", "/ready")] == ["app"] * 3
    for method, path in (("POST", "/generate"), ("POST", "/experts"), ("GET", "/cluster/replicas")):
        refused = client.request(method, path)
        assert refused.status_code == 404 and "proxy" in refused.json()["detail"]
