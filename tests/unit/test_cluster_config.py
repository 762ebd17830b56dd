"""cluster.yaml and the Serve configs, checked offline with Ray's own validators.

The cluster config goes through the JSON schema Ray ships (``ray/autoscaler/ray-schema.json``)
and through the launcher's own ``prepare_config`` + ``validate_config`` (the defaults merge
and checks ``ray up`` runs before it touches the cloud). The ``ray start`` lines are parsed
by Ray's own CLI. The Serve configs go through ``ServeDeploySchema``, their application is
built from its import path the way Serve's controller builds it, and their per-deployment
overrides are applied with the controller's ``override_deployment_info``, so a deployment
name or option Serve would reject at deploy time fails here. Each validator is also shown
to reject a broken copy, so none of them passes by accident.

Nothing here starts Ray (the unit conftest makes that a failure).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"
SERVE_LOCAL = REPO / "serve" / "config.yaml"
SERVE_CLUSTER = REPO / "serve" / "config.cluster.yaml"

# The custom resources that tie the two files (and start_engine) together.
SHARD_RESOURCE = "voucher_shard"  # VOUCHER_SHARD_RESOURCE on the cluster
GATEWAY_RESOURCE = "voucher_gateway"

_ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def _load(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), f"{path} is not a mapping"
    return doc


@pytest.fixture
def cluster() -> dict[str, Any]:
    return _load(CLUSTER_YAML)


@pytest.fixture
def serve_cluster() -> dict[str, Any]:
    return _load(SERVE_CLUSTER)


@pytest.fixture(autouse=True)
def _app_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # build_app reads Settings.from_env() (and, on a cluster, the URLs) from the node's
    # environment; give it well-formed values so the build does not depend on the host.
    monkeypatch.setenv("VOUCHER_DATABASE_URL", "postgresql://voucher@db.internal/voucher")
    monkeypatch.setenv("VOUCHER_REDIS_URL", "redis://redis.internal:6379/0")
    monkeypatch.setenv("VOUCHER_JWT_SECRET", "x" * 32)


# --- cluster.yaml: Ray's schema and launcher checks -------------------------------------


def _ray_schema() -> dict[str, Any]:
    text = (resources.files("ray.autoscaler") / "ray-schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def _schema_validate(config: dict[str, Any]) -> None:
    schema = _ray_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(config, schema, cls=jsonschema.Draft7Validator)


def _launcher_validate(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does before any cloud call: merge the provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared: dict[str, Any] = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_matches_rays_schema(cluster: dict[str, Any]) -> None:
    _schema_validate(cluster)


def test_cluster_yaml_passes_the_launchers_validation(cluster: dict[str, Any]) -> None:
    prepared = _launcher_validate(cluster)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["region"]
    assert prepared["provider"]["availability_zone"]
    assert prepared["head_node_type"] == "head"
    # Our setup replaces the provider defaults' (which install a nightly Ray wheel).
    assert (
        prepared["head_setup_commands"][: len(cluster["setup_commands"])]
        == cluster["setup_commands"]
    )
    assert not any("ray-wheels" in c for c in prepared["worker_setup_commands"])


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        # node resources are integers in Ray's schema
        (
            lambda c: c["available_node_types"]["shard"]["resources"].update(voucher_shard=0.5),
            "schema",
        ),
        # a typo in a node type key is not silently ignored
        (lambda c: c["available_node_types"]["gateway"].update(min_worker=1), "schema"),
        # nor at the top level
        (lambda c: c.update(head_start_commands=["ray start --head"]), "schema"),
        (lambda c: c.update(max_workers="many"), "schema"),
        (lambda c: c["provider"].pop("type"), "schema"),
        # the launcher's own checks, beyond the schema
        (lambda c: c.update(head_node_type="ray.head.default"), "launcher"),
        (lambda c: c.update(max_workers=1), "launcher"),  # below the sum of min_workers
    ],
)
def test_a_broken_cluster_yaml_is_rejected(
    cluster: dict[str, Any], mutate: Any, where: str
) -> None:
    broken = copy.deepcopy(cluster)
    mutate(broken)
    if where == "schema":
        with pytest.raises(jsonschema.ValidationError):
            _schema_validate(broken)
    else:
        _schema_validate(broken)  # valid JSON, wrong meaning: only the launcher catches it
        with pytest.raises(ValueError):
            _launcher_validate(broken)


# --- cluster.yaml: what the engine needs from it ----------------------------------------


def test_node_types_carry_the_placement_resources(cluster: dict[str, Any]) -> None:
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "user work stays off the head"
    assert head.get("max_workers", 0) == 0
    with_shard = [n for n, t in types.items() if t["resources"].get(SHARD_RESOURCE, 0) > 0]
    with_gateway = [n for n, t in types.items() if t["resources"].get(GATEWAY_RESOURCE, 0) > 0]
    assert with_shard == ["shard"]
    assert with_gateway == ["gateway"]
    for name in ("shard", "gateway"):
        t = types[name]
        assert 1 <= t["min_workers"] <= t["max_workers"]
    assert sum(t.get("max_workers", 0) for t in types.values()) <= cluster["max_workers"]
    assert cluster["idle_timeout_minutes"] > 0


def _ray_start(command: str) -> tuple[dict[str, str], list[str]]:
    """Split a start command into the environment given to `ray start` and its arguments."""
    last = command.split("&&")[-1]
    tokens = shlex.split(last)
    env: dict[str, str] = {}
    while tokens and _ENV_ASSIGNMENT.match(tokens[0]):
        key, _, value = tokens.pop(0).partition("=")
        env[key] = value
    assert tokens[:2] == ["ray", "start"], f"not a ray start command: {last!r}"
    return env, tokens[2:]


def _parse_ray_start(argv: list[str]) -> dict[str, Any]:
    from ray.scripts.scripts import start

    params: dict[str, Any] = start.make_context("start", list(argv)).params
    return params


def _start_line(commands: list[str]) -> str:
    lines = [c for c in commands if "ray start" in c]
    assert len(lines) == 1, commands
    assert commands[0] == "ray stop", "a re-run of `ray up` restarts Ray cleanly"
    return lines[0]


def test_head_starts_ray_with_gcs_fault_tolerance_on_external_redis(
    cluster: dict[str, Any],
) -> None:
    line = _start_line(cluster["head_start_ray_commands"])
    env, argv = _ray_start(line)
    assert env["RAY_REDIS_ADDRESS"].startswith("${GCS_REDIS_ADDRESS:?"), "fail if unset"
    assert env["RAY_external_storage_namespace"] == cluster["cluster_name"]
    assert int(env["RAY_gcs_rpc_server_reconnect_timeout_s"]) >= 60
    params = _parse_ray_start(argv)  # Ray's own CLI: an unknown flag raises
    assert params["head"] is True
    assert params["port"] == 6379
    assert params["autoscaling_config"] == "~/ray_bootstrap_config.yaml"
    assert params["redis_password"] == "$GCS_REDIS_PASSWORD"
    # the secrets file is loaded before Ray starts, so every Ray process inherits it
    assert ". ~/voucher.env" in line.split("ray start")[0]


def test_workers_join_the_head(cluster: dict[str, Any]) -> None:
    line = _start_line(cluster["worker_start_ray_commands"])
    env, argv = _ray_start(line)
    assert "RAY_REDIS_ADDRESS" not in env, "only the head's GCS talks to Redis"
    assert int(env["RAY_gcs_rpc_server_reconnect_timeout_s"]) >= 60
    params = _parse_ray_start(argv)
    assert params["head"] is False
    assert params["address"] == "$RAY_HEAD_IP:6379"
    assert ". ~/voucher.env" in line.split("ray start")[0]


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_every_node_runs_serve_in_haproxy_throughput_mode(
    cluster: dict[str, Any], key: str
) -> None:
    env, _ = _ray_start(_start_line(cluster[key]))
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    # uvicorn in Serve's proxies must not take X-Forwarded-For as the client's address
    assert env["FORWARDED_ALLOW_IPS"] == "none"


def test_the_environment_variables_are_the_ones_ray_reads() -> None:
    # Guards against a Ray upgrade renaming them (they are plain strings in cluster.yaml).
    import ray._private.node
    import ray.serve._private.constants

    node_src = Path(ray._private.node.__file__).read_text()
    serve_src = Path(ray.serve._private.constants.__file__).read_text()
    assert 'os.environ.get("RAY_REDIS_ADDRESS")' in node_src
    assert '"RAY_SERVE_ENABLE_HA_PROXY"' in serve_src
    assert '"RAY_SERVE_THROUGHPUT_OPTIMIZED"' in serve_src


def test_a_misspelt_ray_start_flag_is_caught() -> None:
    import click

    with pytest.raises(click.UsageError):
        _parse_ray_start(["--head", "--redis-pasword=x"])


def test_setup_installs_this_checkout_with_the_launchers_ray(cluster: dict[str, Any]) -> None:
    import ray

    mounts = cluster["file_mounts"]
    assert mounts["/home/ubuntu/voucher-engine"] == "."
    assert mounts["/home/ubuntu/voucher.env"].startswith("~/"), "secrets live outside the repo"
    assert ".gitignore" in cluster["rsync_filter"]
    setup = "\n".join(cluster["setup_commands"])
    pins = re.findall(r'"ray\[[a-z,]+\]==([^"]+)"', setup)
    assert pins == [ray.__version__], "the cluster must run the launcher's Ray version"
    assert re.search(r"pip install .* ~/voucher-engine\b", setup)
    assert "chmod 600 ~/voucher.env" in setup


# --- Serve configs -----------------------------------------------------------------------


def _serve_schema(doc: dict[str, Any]) -> Any:
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(doc)


def _deployment_infos(doc: dict[str, Any]) -> dict[str, Any]:
    """Build the app from its import path and apply the config's per-deployment overrides,
    as Serve's controller does on `serve deploy` (its build task and override_deployment_info),
    minus the job id that would need a running Ray."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.application_state import override_deployment_info
    from ray.serve._private.build_app import build_app
    from ray.serve._private.deploy_utils import deploy_args_to_deployment_info

    (app_schema,) = _serve_schema(doc).applications
    app = call_user_app_builder_with_args_if_necessary(
        import_attr(app_schema.import_path), app_schema.args
    )
    built = build_app(app, name=app_schema.name, make_deployment_handle=lambda d, a: None)
    infos = {}
    for d in built.deployments:
        ingress = d.name == built.ingress_deployment_name
        infos[d.name] = deploy_args_to_deployment_info(
            d.name,
            d._deployment_config.to_proto_bytes(),
            d._replica_config.to_proto_bytes(),
            deployer_job_id="",
            app_name=app_schema.name,
            ingress=ingress,
            route_prefix=app_schema.route_prefix if ingress else None,
        )
    result: dict[str, Any] = override_deployment_info(infos, app_schema)
    return result


@pytest.mark.parametrize("path", [SERVE_LOCAL, SERVE_CLUSTER], ids=lambda p: p.name)
def test_serve_config_matches_serves_schema_and_builds(path: Path) -> None:
    doc = _load(path)
    schema = _serve_schema(doc)
    (app,) = schema.applications
    assert app.name == "voucher"
    assert app.import_path == "serve.app:build_app"
    assert schema.proxy_location.value == "EveryNode"
    infos = _deployment_infos(doc)
    assert set(infos) == {
        "Gateway",
        "Users",
        "Campaigns",
        "Vouchers",
        "Delivery",
        "Reports",
        "Notifications",
        "Customers",
        "Issuance",
    }


def test_cluster_serve_config_places_every_replica_on_gateway_nodes(
    serve_cluster: dict[str, Any], cluster: dict[str, Any]
) -> None:
    infos = _deployment_infos(serve_cluster)
    listed = {d["name"] for d in serve_cluster["applications"][0]["deployments"]}
    assert listed == set(infos), "every deployment is placed explicitly"
    node_types = cluster["available_node_types"]
    for name, info in infos.items():
        needs = info.replica_config.resource_dict
        assert (
            0
            < needs.get(GATEWAY_RESOURCE, 0)
            <= node_types["gateway"]["resources"][GATEWAY_RESOURCE]
        ), name
        # only gateway nodes can host it: no other node type has every resource it asks for
        custom = {r for r in needs if r not in ("CPU", "GPU", "memory")}
        hosts = [n for n, t in node_types.items() if custom <= set(t["resources"])]
        assert hosts == ["gateway"], (name, hosts)
    gw = infos["Gateway"]
    auto = gw.deployment_config.autoscaling_config
    assert auto is not None and 1 <= auto.min_replicas < auto.max_replicas
    assert gw.replica_config.resource_dict["CPU"] == 1, "CPU is what sizes gateway nodes"
    http = _serve_schema(serve_cluster).http_options
    assert http.host == "0.0.0.0"


def test_cluster_serve_config_carries_no_secrets(serve_cluster: dict[str, Any]) -> None:
    (app,) = serve_cluster["applications"]
    assert app["args"]["database_url"] is None
    assert app["args"]["redis_url"] is None
    assert "settings" not in app["args"]
    assert "runtime_env" not in app


@pytest.mark.parametrize(
    ("mutate", "stage", "match"),
    [
        (lambda a: a["deployments"][1].update(num_replicas=0), "schema", "num_replicas"),
        (
            lambda a: a["deployments"][1]["ray_actor_options"].update(num_cpus=-1),
            "schema",
            "num_cpus",
        ),
        (lambda a: a.update(import_path="serve.app:build_app:x"), "schema", "at most one colon"),
        # valid to the schema, rejected when Serve applies the config to the built app
        (
            lambda a: a["deployments"][0].update(name="Gatway"),
            "override",
            "'Gatway' does not exist",
        ),
        (
            lambda a: a["deployments"][0]["autoscaling_config"].update(min_replicas=30),
            "override",
            "must be greater than or equal to min_replicas",
        ),
        (lambda a: a.update(import_path="serve.app:no_such_builder"), "import", "no_such_builder"),
    ],
)
def test_a_broken_serve_config_is_rejected(
    serve_cluster: dict[str, Any], mutate: Any, stage: str, match: str
) -> None:
    import pydantic

    broken = copy.deepcopy(serve_cluster)
    mutate(broken["applications"][0])
    if stage == "schema":
        with pytest.raises(pydantic.ValidationError, match=match):
            _serve_schema(broken)
        return
    _serve_schema(broken)
    expected: type[Exception] = ValueError if stage == "override" else AttributeError
    with pytest.raises(expected, match=match):
        _deployment_infos(broken)
