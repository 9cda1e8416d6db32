"""VM templates rendered and checked by the real validators: cloud-init, libvirt, systemd."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from workers import vm
from workers.vm_cli import app

UNIT = vm.WORKER_UNIT
VARS: dict[str, Any] = {
    "operators": [
        {"name": "alice", "ssh_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGr6 alice@laptop"]},
        {
            "name": "bob",
            "ssh_keys": ["ssh-rsa AAAAB3NzaC1yc2EAAAADAQAB bob", "ssh-ed25519 AAAA b2"],
        },
    ],
    "proxy_url": "http://m1:token@10.0.0.1:8080",
    "ca_cert": "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----\n",
    "nomad_servers": ["10.0.0.2:4647", "10.0.0.3:4647"],
    "autovibe_repo": "https://git.example.org/autovibe.git",
    "autovibe_ref": "main",
}
GPU = {"gpus": ["0000:41:00.0", "0000:c1:00.0"], "gpu_model": "H100"}


def validator(command: str, package: str) -> str:
    """The validator's path; missing, the test fails (`make setup` installs it), never skips."""
    path = shutil.which(command)
    assert path, f"{command} not found: install the Debian package {package} (make setup does)"
    return path


def check(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def rendered(tmp_path: Path, template: str, **spec: Any) -> Path:
    out = tmp_path / template
    vm.write(vm.render(template, vm.VmSpec(**spec), VARS), out)
    return out


CASES = [
    ("base", {}),
    ("worker", {}),
    ("worker", {"desktop": True, "host_data_root": "/srv/autovibe"}),
    ("gpu-worker", GPU),
    # As `autovibe vm up` renders it for a built image on a host without KVM.
    (
        "worker",
        {
            "accel": "tcg",
            "kernel": "/var/lib/libvirt/images/autovibe-k/vmlinuz",
            "initrd": "/var/lib/libvirt/images/autovibe-k/initrd.img",
            "cmdline": "root=/dev/vda rw console=ttyS0",
            "provisioned": True,
            "desktop": True,
        },
    ),
]


def test_every_template_is_listed() -> None:
    assert vm.templates() == ["base", "gpu-worker", "worker"]


@pytest.mark.parametrize(("template", "spec"), CASES)
def test_user_data_passes_cloud_init_schema(
    tmp_path: Path, template: str, spec: dict[str, Any]
) -> None:
    cloud_init = validator("cloud-init", "cloud-init")
    out = rendered(tmp_path, template, **spec)
    for name in ("user-data", "meta-data"):
        if name == "meta-data":
            assert yaml.safe_load((out / name).read_text())["instance-id"] == "autovibe-worker"
            continue
        proc = check([cloud_init, "schema", "--config-file", str(out / name)])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Valid cloud-config" in proc.stdout


def test_cloud_init_schema_catches_a_bad_file(tmp_path: Path) -> None:
    """The validator bites: a wrong type is an error, so a pass above means something."""
    cloud_init = validator("cloud-init", "cloud-init")
    bad = tmp_path / "user-data"
    bad.write_text("#cloud-config\npackages: 5\n")
    proc = check([cloud_init, "schema", "--config-file", str(bad)])
    assert proc.returncode != 0 and "packages" in proc.stdout + proc.stderr


@pytest.mark.parametrize(("template", "spec"), CASES)
def test_domain_xml_passes_virt_xml_validate(
    tmp_path: Path, template: str, spec: dict[str, Any]
) -> None:
    virt_xml_validate = validator("virt-xml-validate", "libvirt-clients")
    validator("xmllint", "libxml2-utils")  # virt-xml-validate runs it
    out = rendered(tmp_path, template, **spec)
    proc = check([virt_xml_validate, str(out / "domain.xml"), "domain"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_virt_xml_validate_catches_a_bad_domain(tmp_path: Path) -> None:
    virt_xml_validate = validator("virt-xml-validate", "libvirt-clients")
    validator("xmllint", "libxml2-utils")
    xml = (rendered(tmp_path, "worker") / "domain.xml").read_text()
    bad = tmp_path / "bad.xml"
    bad.write_text(xml.replace('<vcpu placement="static">64</vcpu>', "<vcpu>many</vcpu>"))
    proc = check([virt_xml_validate, str(bad), "domain"])
    assert proc.returncode != 0


def test_defaults_and_what_each_level_adds(tmp_path: Path) -> None:
    base = yaml.safe_load((rendered(tmp_path, "base") / "user-data").read_text())
    worker = yaml.safe_load((rendered(tmp_path, "worker") / "user-data").read_text())
    desk_dir = rendered(tmp_path / "d", "worker", desktop=True, host_data_root="/srv/av")
    desktop = yaml.safe_load((desk_dir / "user-data").read_text())
    gpu_dir = rendered(tmp_path, "gpu-worker", **GPU)
    gpu = yaml.safe_load((gpu_dir / "user-data").read_text())

    assert [u["name"] for u in base["users"]] == ["alice", "bob"]
    assert base["users"][1]["ssh_authorized_keys"] == VARS["operators"][1]["ssh_keys"]
    files = {f["path"]: f for f in base["write_files"]}
    ca = files["/usr/local/share/ca-certificates/autovibe-proxy.crt"]
    assert ca["content"] == VARS["ca_cert"]
    environment = files["/etc/environment"]
    assert environment["append"] is True
    assert f"HTTPS_PROXY={VARS['proxy_url']}\n" in environment["content"]
    assert (
        "NODE_EXTRA_CA_CERTS=/usr/local/share/ca-certificates/autovibe-proxy.crt\n"
        in (environment["content"])
    )
    nomad_hcl = files["/etc/nomad.d/nomad.hcl"]["content"]
    assert 'servers    = ["10.0.0.2:4647", "10.0.0.3:4647"]' in nomad_hcl
    assert "/etc/systemd/system/autovibe-worker@.service" not in files

    wfiles = {f["path"]: f for f in worker["write_files"]}
    assert wfiles["/etc/systemd/system/autovibe-worker@.service"]["content"] == UNIT.read_text()
    assert {"bubblewrap", "socat", "python3-venv"} <= set(worker["packages"])
    assert "tigervnc-standalone-server" not in worker["packages"]
    assert "mounts" not in worker
    assert 'node_class = "worker"' in wfiles["/etc/nomad.d/nomad.hcl"]["content"]

    dfiles = {f["path"]: f for f in desktop["write_files"]}
    assert "tigervnc-standalone-server" in desktop["packages"]
    assert "-localhost" in dfiles["/etc/systemd/system/autovibe-desktop.service"]["content"]
    assert "DISPLAY=:1" in dfiles["/etc/environment"]["content"]
    assert desktop["mounts"] == [
        ["autovibe-data", "/mnt/data/autovibe", "virtiofs", "defaults,nofail", "0", "0"]
    ]
    assert '<driver type="virtiofs"/>' in (desk_dir / "domain.xml").read_text()

    assert "nvidia-driver-550-server" in gpu["packages"]
    assert set(worker["packages"]) < set(gpu["packages"])
    xml = (gpu_dir / "domain.xml").read_text()
    assert '<address domain="0x0000" bus="0xc1" slot="0x00" function="0x0"/>' in xml
    assert '<vcpu placement="static">64</vcpu>' in xml
    assert '<memory unit="MiB">8192</memory>' in xml
    hcl = (gpu_dir / "nomad-client.hcl").read_text()
    assert '"autovibe.gpu_count" = "2"' in hcl and '"autovibe.gpu_model" = "H100"' in hcl
    assert 'path      = "/mnt/data/autovibe"' in hcl


def test_default_spec_is_64_vcpu_8_gb_128_gb_ubuntu_lts() -> None:
    spec = vm.VmSpec()
    assert (spec.vcpus, spec.memory_mb, spec.disk_gb) == (64, 8192, 128)
    assert "ubuntu-24.04" in spec.image
    assert str(spec.disk) == "/var/lib/libvirt/images/autovibe-worker.qcow2"


def test_every_missing_variable_is_named_at_once() -> None:
    with pytest.raises(vm.VmTemplateError) as caught:
        vm.render("worker", vm.VmSpec(), {"proxy_url": "http://m:t@h:1"})
    message = str(caught.value)
    assert message.startswith("worker: 5 variables missing")
    for name in ("operators", "ca_cert", "nomad_servers", "autovibe_repo", "autovibe_ref"):
        assert f"\n  {name}: {vm.VARIABLES[name]}" in message
    assert "proxy_url" not in message.split(":", 2)[2]
    assert "configs/vm/example.vars.yaml" in message
    partial = {k: v for k, v in VARS.items() if k != "autovibe_repo"}
    with pytest.raises(vm.VmTemplateError, match=r"1 variable missing.*\n  autovibe_repo: git"):
        vm.render("worker", vm.VmSpec(), partial)


def test_required_variables_are_read_from_the_templates(tmp_path: Path) -> None:
    """What a template needs comes from its files and every file they extend, so a variable
    added to a template is required (and must be described) without another list to edit."""
    assert vm.required("base") == ["ca_cert", "nomad_servers", "operators", "proxy_url"]
    assert vm.required("worker") == sorted([*vm.required("base"), "autovibe_ref", "autovibe_repo"])
    assert vm.required("gpu-worker") == vm.required("worker")
    every = {name for t in vm.templates() for name in vm.required(t)}
    assert every == set(vm.VARIABLES)  # each described, none described in vain
    folder = tmp_path / "templates"
    shutil.copytree(vm.TEMPLATES, folder)
    page = folder / "worker" / "meta-data.j2"
    page.write_text(page.read_text() + "owner: {{ owner_email | tojson }}\n")
    assert "owner_email" in vm.required("worker", folder)
    assert "owner_email" not in vm.required("base", folder)


def test_gpu_worker_needs_gpus_and_unknown_templates_are_named() -> None:
    with pytest.raises(vm.VmTemplateError, match=r"gpu-worker needs vm\.gpus"):
        vm.render("gpu-worker", vm.VmSpec(), VARS)
    with pytest.raises(vm.VmTemplateError, match="allowed: base, gpu-worker, worker"):
        vm.render("desktop", vm.VmSpec(), VARS)
    with pytest.raises(vm.VmTemplateError, match=r"gpus: .*'41:00' is not a PCI address"):
        vm.split_vars({"gpus": "41:00"})


def test_values_are_escaped_for_each_format(tmp_path: Path) -> None:
    variables = {**VARS, "operators": [{"name": 'eve"\nx: 1', "ssh_keys": ["k"]}]}
    spec = vm.VmSpec(network="net<&>", datacenter="dc-${evil}")
    out = vm.render("worker", spec, variables)
    assert yaml.safe_load(out["user-data"])["users"][0]["name"] == 'eve"\nx: 1'
    assert '<source network="net&lt;&amp;&gt;"/>' in out["domain.xml"]
    assert 'datacenter = "dc-$${evil}"' in out["nomad-client.hcl"]


def test_cli_render_writes_the_files(tmp_path: Path) -> None:
    vars_file = tmp_path / "vars.yaml"
    vars_file.write_text(yaml.safe_dump({k: v for k, v in VARS.items() if k != "ca_cert"}))
    ca = tmp_path / "data" / "proxy" / "mitmproxy-ca-cert.pem"
    ca.parent.mkdir(parents=True)
    ca.write_text(VARS["ca_cert"])
    result = CliRunner().invoke(
        app,
        [
            "render", "gpu-worker", "--out", str(tmp_path / "out"), "--vars", str(vars_file),
            "--var", "vcpus=16", "--var", "gpus=0000:41:00.0", "--var", "name=gpu-7",
            "--var", 'nomad_servers=["10.9.9.9:4647"]',
        ],
        env={"AUTOVIBE_DATA": str(tmp_path / "data")},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted([*vm.OUTPUTS, "vm.json"])
    assert '<vcpu placement="static">16</vcpu>' in (out / "domain.xml").read_text()
    assert "<name>gpu-7</name>" in (out / "domain.xml").read_text()
    assert '["10.9.9.9:4647"]' in (out / "nomad-client.hcl").read_text()
    assert "MIIBszCCAVmgAwIBAgIU" in (out / "user-data").read_text()  # CA from the data root
    assert vm.VmSpec.model_validate_json((out / "vm.json").read_text()).vcpus == 16


def test_cli_names_every_missing_variable(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["render", "worker", "--out", str(tmp_path / "out"), "--var", "proxy_url=http://p:1"],
        env={"AUTOVIBE_DATA": str(tmp_path / "data")},
    )
    assert result.exit_code == 2
    for name in ("operators", "ca_cert", "nomad_servers", "autovibe_repo", "autovibe_ref"):
        assert f"  {name}: " in result.output
    assert not (tmp_path / "out").exists()
    bad = CliRunner().invoke(
        app, ["render", "worker", "--out", str(tmp_path / "o"), "--var", "vcpus=lots"]
    )
    assert bad.exit_code == 2 and "vcpus" in bad.output


def test_cli_vars_lists_every_variable_with_meaning_and_default() -> None:
    result = CliRunner().invoke(app, ["vars", "gpu-worker"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if "│" in line}
    for name in vm.required("gpu-worker"):
        assert "required" in rows[name] and vm.VARIABLES[name][:40] in rows[name]
    for name, field in vm.VmSpec.model_fields.items():
        assert field.description, f"VmSpec.{name} has no docstring"
        assert " ".join(field.description.split())[:40] in rows[name]
    assert rows["vcpus"].split("│")[2].strip() == "64"
    assert rows["data_root"].split("│")[2].strip() == "/mnt/data/autovibe"
    unknown = CliRunner().invoke(app, ["vars", "desktop"])
    assert unknown.exit_code == 2 and "allowed: base, gpu-worker, worker" in unknown.output


@pytest.mark.parametrize("template", ["base", "worker", "gpu-worker"])
def test_the_example_vars_file_renders_every_template(tmp_path: Path, template: str) -> None:
    """The shipped example, with the CA from the data root, is all a template needs."""
    ca = tmp_path / "data" / "proxy" / "mitmproxy-ca-cert.pem"
    ca.parent.mkdir(parents=True)
    ca.write_text(VARS["ca_cert"])
    extra = ["--var", "gpus=0000:41:00.0"] if template == "gpu-worker" else []
    result = CliRunner().invoke(
        app,
        [
            "render",
            template,
            "--out",
            str(tmp_path / "out"),
            "--vars",
            str(vm.EXAMPLE_VARS),
            *extra,
        ],
        env={"AUTOVIBE_DATA": str(tmp_path / "data")},
    )
    assert result.exit_code == 0, result.output
    example = yaml.safe_load(vm.EXAMPLE_VARS.read_text())
    assert set(vm.required(template)) - {"ca_cert"} <= set(example)
    user_data = yaml.safe_load((tmp_path / "out" / "user-data").read_text())
    assert user_data["hostname"] == example["name"]


def test_worker_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """Verified in a root laid out as the VM has it: autovibe's venv where cloud-init puts it,
    the host's systemd units beside ours (verify resolves After=/Wants= against them)."""
    analyze = validator("systemd-analyze", "systemd")
    root = tmp_path / "root"
    python = root / "opt" / "autovibe" / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    shutil.copy(UNIT, units / UNIT.name)
    host_units = Path("/lib/systemd/system")
    shutil.copytree(host_units, root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    instance = "autovibe-worker@mnt-data-autovibe-worker\\x2dartifacts-p-t-a-spec.json.service"
    proc = check([analyze, "verify", f"--root={root}", instance])
    own = [line for line in proc.stderr.splitlines() if "autovibe-worker" in line]
    assert proc.returncode == 0 and not own, proc.stderr
    # The same check fails when the program is not where the unit says: it is really checked.
    python.unlink()
    proc = check([analyze, "verify", f"--root={root}", instance])
    assert proc.returncode != 0 and "/opt/autovibe/.venv/bin/python" in proc.stderr
