"""install-service, uninstall-service, service-status: launchd and systemd.

Nothing here touches the real system: files go under a scratch ``--root``
and ``launchctl``, ``systemctl`` and ``groupadd`` are stand-ins on PATH that
record their arguments and answer as each test tells them.
"""

import io
import json
import os
import plistlib
import stat
import sys
from pathlib import Path

import pytest

from vmnet_broker import cli, service
from vmnet_broker.service import ServiceError, ServiceOptions, launchd, run_command, systemd

UPSTREAM_PLIST = {
    "Label": "com.github.nirs.vmnet-broker",
    "Program": "/Library/Application Support/vmnet-broker/vmnet-broker",
    "MachServices": {"com.github.nirs.vmnet-broker": True},
    "UserName": "_vmnetbroker",
    "EnableTransactions": True,
    "ExitTimeout": 60,
    "StandardErrorPath": "/Library/Logs/vmnet-broker/vmnet-broker.log",
}

FAKE = """#!{python}
import json, os, sys
argv = [os.path.basename(sys.argv[0]), *sys.argv[1:]]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\\n")
with open(os.environ["FAKE_ANSWERS"]) as f:
    answers = json.load(f)
if argv[:2] == ["launchctl", "bootout"]:  # the job is gone: so are the answers that said it was loaded
    with open(os.environ["FAKE_ANSWERS"], "w") as f:
        json.dump([a for a in answers if not a.get("until_bootout")], f)
for answer in answers:  # the first whose argv is a prefix of ours
    if argv[: len(answer["argv"])] == answer["argv"]:
        sys.stdout.write(answer.get("stdout", ""))
        sys.stderr.write(answer.get("stderr", ""))
        sys.exit(answer.get("rc", 0))
"""

PRINT_RUNNING = """system/com.github.nirs.vmnet-broker = {
\tactive count = 1
\tpath = /Library/LaunchDaemons/com.github.nirs.vmnet-broker.plist
\ttype = LaunchDaemon
\tstate = running

\tprogram = /opt/vmnet-broker/bin/python3
\targuments = {
\t\t/opt/vmnet-broker/bin/python3
\t\tstate = nested, not ours
\t}

\tpid = 4242
\tlast exit code = (never exited)
}
"""


class Commands:
    """Stand-in commands on PATH: what they were run with, what they answer."""

    def __init__(self, directory: Path) -> None:
        self.bin = directory / "bin"
        self.bin.mkdir()
        self.log = directory / "commands.log"
        self.log.touch()
        self.answers_file = directory / "answers.json"
        self.answers: list[dict] = []
        self._save()
        for name in ("launchctl", "systemctl", "groupadd"):
            path = self.bin / name
            path.write_text(FAKE.format(python=sys.executable))
            path.chmod(0o755)

    def answer(self, *argv: str, rc: int = 0, stdout: str = "", stderr: str = "", until_bootout: bool = False) -> None:
        """Commands starting with ``argv`` answer so (the latest call wins);
        ``until_bootout``: only until a ``launchctl bootout`` has run."""
        self._load()
        answer = {"argv": list(argv), "rc": rc, "stdout": stdout, "stderr": stderr, "until_bootout": until_bootout}
        self.answers.insert(0, answer)
        self._save()

    def _load(self) -> None:
        self.answers = json.loads(self.answers_file.read_text())

    def _save(self) -> None:
        self.answers_file.write_text(json.dumps(self.answers))

    @property
    def run(self) -> list[list[str]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def commands(tmp_path, monkeypatch):
    fake = Commands(tmp_path)
    monkeypatch.setenv("PATH", f"{fake.bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(fake.log))
    monkeypatch.setenv("FAKE_ANSWERS", str(fake.answers_file))
    fake.answer("launchctl", "print", rc=113, stderr="Could not find service in domain for system\n")
    fake.answer("systemctl", "is-active", rc=3, stdout="inactive\n")
    return fake


@pytest.fixture
def root(tmp_path):
    path = tmp_path / "root"
    path.mkdir()
    return path


def options(root, **changes):
    return ServiceOptions(root=root, python="/opt/vmnet-broker/bin/python3", **changes)


# -- launchd: the plist (pure) ---------------------------------------------------------------


def test_launchd_job_runs_this_python_on_demand_as_root():
    job = launchd.job("com.github.nirs.vmnet-broker", "/opt/vmnet-broker/bin/python3")
    assert job == {
        "Label": "com.github.nirs.vmnet-broker",
        "ProgramArguments": ["/opt/vmnet-broker/bin/python3", "-m", "vmnet_broker", "serve", "--exit-idle", "120"],
        "MachServices": {"com.github.nirs.vmnet-broker": True},
        "EnableTransactions": True,
        "ExitTimeOut": 60,
        "StandardErrorPath": "/Library/Logs/vmnet-broker/vmnet-broker.log",
    }
    assert "UserName" not in job and "RunAtLoad" not in job and "KeepAlive" not in job
    assert launchd.is_ours(job) and not launchd.is_ours(UPSTREAM_PLIST)


def test_the_plist_in_docs_launchd_md_is_the_generated_one():
    docs = (Path(__file__).parent.parent / "docs/launchd.md").read_text()
    documented = docs.split("```xml\n", 1)[1].split("```", 1)[0]
    job = launchd.job("com.github.nirs.vmnet-broker", "/opt/vmnet-broker/bin/python3")
    assert documented == plistlib.dumps(job).decode()


def test_launchd_job_with_another_label_serves_that_mach_name():
    job = launchd.job("org.example.vmnet", "/usr/bin/python3", exit_idle=30.5)
    assert job["ProgramArguments"][4:] == ["--exit-idle", "30.5", "--service-name", "org.example.vmnet"]
    assert job["MachServices"] == {"org.example.vmnet": True} and job["Label"] == "org.example.vmnet"


def test_launchctl_print_is_summarized_from_the_jobs_own_lines():
    fields = launchd.parse_print(PRINT_RUNNING)
    assert fields["state"] == "running" and fields["pid"] == "4242"
    assert "arguments" not in fields  # a nested block


# -- launchd: install, uninstall, status --------------------------------------------------


def test_launchd_install_writes_the_plist_and_bootstraps_it(root, commands):
    done = launchd.install(options(root), run_command)
    plist = root / "Library/LaunchDaemons/com.github.nirs.vmnet-broker.plist"
    with open(plist, "rb") as f:
        assert plistlib.load(f) == launchd.job("com.github.nirs.vmnet-broker", "/opt/vmnet-broker/bin/python3")
    assert stat.S_IMODE(plist.stat().st_mode) == 0o644
    if os.geteuid() == 0:
        assert (plist.stat().st_uid, plist.stat().st_gid) == (0, 0)
    assert (root / "Library/Logs/vmnet-broker").is_dir()
    assert commands.run == [
        ["launchctl", "print", "system/com.github.nirs.vmnet-broker"],
        ["launchctl", "bootstrap", "system", str(plist)],
    ]
    assert f"wrote {plist}" in done


def test_launchd_refuses_upstreams_job_for_the_same_mach_name(root, commands):
    daemons = root / "Library/LaunchDaemons"
    daemons.mkdir(parents=True)
    upstream = daemons / "com.github.nirs.vmnet-broker.plist"
    upstream.write_bytes(plistlib.dumps(UPSTREAM_PLIST))
    commands.answer("launchctl", "print", rc=0, stdout=PRINT_RUNNING)
    with pytest.raises(ServiceError, match="vmnet-broker/vmnet-broker.*not ours.*--replace"):
        launchd.install(options(root), run_command)
    assert plistlib.loads(upstream.read_bytes()) == UPSTREAM_PLIST  # untouched
    assert [argv[:2] for argv in commands.run] == [["launchctl", "print"]]  # and nothing else run


def test_launchd_refuses_another_label_serving_our_mach_name(root, commands):
    daemons = root / "Library/LaunchDaemons"
    daemons.mkdir(parents=True)
    (daemons / "org.example.other.plist").write_bytes(plistlib.dumps(dict(UPSTREAM_PLIST, Label="org.example.other")))
    with pytest.raises(ServiceError, match="org.example.other"):
        launchd.install(options(root), run_command)


def test_launchd_refuses_a_loaded_job_without_a_plist(root, commands):
    commands.answer("launchctl", "print", rc=0, stdout=PRINT_RUNNING)
    with pytest.raises(ServiceError, match="no plist in /Library/LaunchDaemons"):
        launchd.install(options(root), run_command)


def test_launchd_replace_boots_out_upstream_and_installs_ours(root, commands):
    daemons = root / "Library/LaunchDaemons"
    daemons.mkdir(parents=True)
    plist = daemons / "com.github.nirs.vmnet-broker.plist"
    plist.write_bytes(plistlib.dumps(UPSTREAM_PLIST))
    commands.answer("launchctl", "print", rc=0, stdout=PRINT_RUNNING, until_bootout=True)
    launchd.install(options(root, replace=True), run_command)
    assert launchd.is_ours(plistlib.loads(plist.read_bytes()))
    assert commands.run == [
        ["launchctl", "print", "system/com.github.nirs.vmnet-broker"],
        ["launchctl", "bootout", "system/com.github.nirs.vmnet-broker"],
        ["launchctl", "print", "system/com.github.nirs.vmnet-broker"],  # gone before bootstrap
        ["launchctl", "bootstrap", "system", str(plist)],
    ]


def test_launchd_replace_disables_another_label_for_our_mach_name(root, commands):
    daemons = root / "Library/LaunchDaemons"
    daemons.mkdir(parents=True)
    other = daemons / "org.example.other.plist"
    other.write_bytes(plistlib.dumps(dict(UPSTREAM_PLIST, Label="org.example.other")))
    done = launchd.install(options(root, replace=True), run_command)
    assert other.exists()
    assert commands.run[1:3] == [
        ["launchctl", "bootout", "system/org.example.other"],
        ["launchctl", "disable", "system/org.example.other"],
    ]
    assert any("disabled system/org.example.other" in line for line in done)


def test_launchd_reinstalling_ours_boots_it_out_first(root, commands):
    launchd.install(options(root), run_command)
    commands.answer("launchctl", "print", rc=0, stdout=PRINT_RUNNING, until_bootout=True)
    launchd.install(options(root, exit_idle=30), run_command)
    plist = root / "Library/LaunchDaemons/com.github.nirs.vmnet-broker.plist"
    assert plistlib.loads(plist.read_bytes())["ProgramArguments"][-1] == "30"
    assert commands.run[2:] == [
        ["launchctl", "print", "system/com.github.nirs.vmnet-broker"],
        ["launchctl", "bootout", "system/com.github.nirs.vmnet-broker"],
        ["launchctl", "print", "system/com.github.nirs.vmnet-broker"],
        ["launchctl", "bootstrap", "system", str(plist)],
    ]


def test_launchd_a_job_that_does_not_go_away_is_not_bootstrapped_over(root, commands, monkeypatch):
    monkeypatch.setattr(launchd, "BOOTOUT_WAIT", 0.5)
    launchd.install(options(root), run_command)
    commands.answer("launchctl", "print", rc=0, stdout=PRINT_RUNNING)  # still there after bootout
    with pytest.raises(ServiceError, match="still loaded 0.5 s after bootout"):
        launchd.install(options(root), run_command)
    assert ["launchctl", "bootstrap"] not in [argv[:2] for argv in commands.run[3:]]


def test_root_must_own_the_code_the_service_runs(tmp_path):
    from vmnet_broker.service import unsafe_paths

    safe = tmp_path / "safe"
    safe.mkdir(mode=0o755)
    (safe / "python").touch(mode=0o755)
    assert unsafe_paths([safe / "python"]) == []
    os.chmod(safe, 0o777)
    assert unsafe_paths([safe / "python"]) == [f"{safe} is writable by group or others (mode 0777)"]
    os.chmod(safe, 0o755)
    os.chown(safe / "python", 65534, 65534)
    assert unsafe_paths([safe / "python"]) == [f"{safe / 'python'} is owned by uid 65534, not root"]


def test_launchd_a_failed_bootstrap_is_an_error_naming_the_step(root, commands):
    commands.answer("launchctl", "bootstrap", rc=5, stderr="Bootstrap failed: 5: Input/output error\n")
    with pytest.raises(ServiceError, match="launchctl bootstrap system .* failed \\(exit 5\\): Bootstrap failed"):
        launchd.install(options(root), run_command)


def test_launchd_uninstall_boots_out_and_removes_the_plist(root, commands):
    launchd.install(options(root), run_command)
    commands.answer("launchctl", "print", rc=0, stdout=PRINT_RUNNING)
    done = launchd.uninstall(options(root), run_command)
    assert not (root / "Library/LaunchDaemons/com.github.nirs.vmnet-broker.plist").exists()
    assert (root / "Library/Logs/vmnet-broker").is_dir()  # logs are kept
    assert commands.run[-2:] == [
        ["launchctl", "print", "system/com.github.nirs.vmnet-broker"],
        ["launchctl", "bootout", "system/com.github.nirs.vmnet-broker"],
    ]
    assert done[0] == "booted out system/com.github.nirs.vmnet-broker"


def test_launchd_uninstall_leaves_upstreams_job_alone(root, commands):
    daemons = root / "Library/LaunchDaemons"
    daemons.mkdir(parents=True)
    (daemons / "com.github.nirs.vmnet-broker.plist").write_bytes(plistlib.dumps(UPSTREAM_PLIST))
    commands.answer("launchctl", "print", rc=0, stdout=PRINT_RUNNING)
    with pytest.raises(ServiceError, match="not ours"):
        launchd.uninstall(options(root), run_command)
    assert commands.run == []


def test_launchd_uninstall_of_nothing_says_so(root, commands):
    assert launchd.uninstall(options(root), run_command) == ["system/com.github.nirs.vmnet-broker is not installed"]


def test_launchd_status(root, commands):
    status = launchd.status(options(root), run_command)
    assert not status.running and status.lines[0] == "system/com.github.nirs.vmnet-broker: not loaded"
    launchd.install(options(root), run_command)
    commands.answer("launchctl", "print", rc=0, stdout=PRINT_RUNNING)
    status = launchd.status(options(root), run_command)
    assert status.running
    assert status.lines == [
        "system/com.github.nirs.vmnet-broker: loaded, running, pid 4242, last exit code (never exited)",
        f"plist: {root}/Library/LaunchDaemons/com.github.nirs.vmnet-broker.plist (ours)",
    ]


# -- systemd: the units (pure) -------------------------------------------------------------


def test_systemd_units_are_the_documented_ones_marked_ours():
    socket_unit = systemd.socket_unit("vmnet")
    assert socket_unit.startswith(systemd.MARKER + "\n")
    for line in ("ListenSequentialPacket=/run/vmnet-broker/broker.sock", "SocketMode=0660", "SocketGroup=vmnet"):
        assert line in socket_unit.splitlines()
    service_unit = systemd.service_unit("vmnet-broker", "/opt/vmnet-broker/bin/python3")
    lines = service_unit.splitlines()
    for line in (
        "Requires=vmnet-broker.socket",
        "Type=notify",
        "ExecStart=/opt/vmnet-broker/bin/python3 -m vmnet_broker serve --state-dir /var/lib/vmnet-broker",
        "KillMode=mixed",
        "StateDirectory=vmnet-broker",
    ):
        assert line in lines


def test_systemd_execstart_quotes_and_escapes_what_systemd_would_interpret():
    unit = systemd.service_unit("vmnet-broker", "/opt/my venv/100%/$HOME/python3", exit_idle=300)
    (line,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert line == 'ExecStart="/opt/my venv/100%%/$$HOME/python3" -m vmnet_broker serve ' \
        "--state-dir /var/lib/vmnet-broker --exit-idle 300"  # fmt: skip


def test_the_units_in_docs_systemd_md_match_the_generated_ones():
    docs = (Path(__file__).parent.parent / "docs/systemd.md").read_text()
    for line in systemd.socket_unit("vmnet").splitlines()[1:]:
        assert line in docs
    for line in systemd.service_unit("vmnet-broker", "python").splitlines()[1:]:
        if not line.startswith("ExecStart="):
            assert line in docs


# -- systemd: install, uninstall, status -----------------------------------------------------


def test_systemd_install_creates_the_group_writes_units_and_starts_the_socket(root, commands):
    done = systemd.install(options(root, socket_group="vmnet-test-no-such-group"), run_command)
    socket_path = root / "etc/systemd/system/vmnet-broker.socket"
    service_path = root / "etc/systemd/system/vmnet-broker.service"
    assert socket_path.read_text() == systemd.socket_unit("vmnet-test-no-such-group")
    assert service_path.read_text() == systemd.service_unit("vmnet-broker", "/opt/vmnet-broker/bin/python3")
    assert stat.S_IMODE(service_path.stat().st_mode) == 0o644
    assert commands.run == [
        ["groupadd", "--system", "vmnet-test-no-such-group"],
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "--now", "vmnet-broker.socket"],
        ["systemctl", "is-active", "--quiet", "vmnet-broker.service"],
    ]
    assert "created group vmnet-test-no-such-group" in done[0]


def test_systemd_install_keeps_an_existing_group(root, commands):
    systemd.install(options(root, socket_group="root"), run_command)
    assert ["groupadd", "--system", "root"] not in commands.run


def test_systemd_refuses_units_that_are_not_ours_unless_replace(root, commands):
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    theirs = unit_dir / "vmnet-broker.service"
    theirs.write_text("[Service]\nExecStart=/usr/bin/something-else\n")
    with pytest.raises(ServiceError, match="vmnet-broker.service is not ours; --replace"):
        systemd.install(options(root, socket_group="root"), run_command)
    assert commands.run == [] and "something-else" in theirs.read_text()

    systemd.install(options(root, socket_group="root", replace=True), run_command)
    assert systemd.is_ours(theirs)
    assert commands.run[0] == ["systemctl", "stop", "vmnet-broker.socket", "vmnet-broker.service"]


def test_systemd_reinstall_says_a_running_broker_keeps_the_old_units(root, commands):
    commands.answer("systemctl", "is-active", rc=0, stdout="active\n")
    done = systemd.install(options(root, socket_group="root"), run_command)
    assert "systemctl restart vmnet-broker.service" in done[-1]


def test_systemd_a_failed_step_stops_the_install(root, commands):
    commands.answer("systemctl", "enable", rc=1, stderr="Failed to enable unit\n")
    with pytest.raises(ServiceError, match="systemctl enable --now vmnet-broker.socket failed \\(exit 1\\)"):
        systemd.install(options(root, socket_group="root"), run_command)


def test_systemd_uninstall_stops_disables_and_removes_our_units(root, commands):
    systemd.install(options(root, socket_group="root", label="vmnb"), run_command)
    done = systemd.uninstall(options(root, label="vmnb"), run_command)
    assert not list((root / "etc/systemd/system").iterdir())
    assert commands.run[-2:] == [
        ["systemctl", "disable", "--now", "vmnb.socket", "vmnb.service"],
        ["systemctl", "daemon-reload"],
    ]
    assert done[0] == "stopped and disabled vmnb.socket and vmnb.service"


def test_systemd_uninstall_leaves_foreign_units_and_nothing_to_do_is_said(root, commands):
    assert systemd.uninstall(options(root), run_command) == ["vmnet-broker is not installed"]
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    (unit_dir / "vmnet-broker.socket").write_text("[Socket]\n")
    with pytest.raises(ServiceError, match="not ours; not removing"):
        systemd.uninstall(options(root), run_command)
    assert commands.run == []


def test_systemd_status(root, commands):
    commands.answer("systemctl", "is-active", rc=0, stdout="active\n")
    commands.answer("systemctl", "show", stdout="ActiveState=active\nSubState=running\nMainPID=777\n")
    status = systemd.status(options(root), run_command)
    assert status.running
    assert status.lines[:2] == ["vmnet-broker.socket: active", "vmnet-broker.service: active (running), pid 777"]
    assert status.lines[2].endswith("vmnet-broker.service (missing)")
    assert commands.run == [
        ["systemctl", "is-active", "vmnet-broker.socket"],
        ["systemctl", "show", "vmnet-broker.service", "--property=ActiveState,SubState,MainPID"],
    ]


# -- the command line ------------------------------------------------------------------------


def test_the_platform_is_chosen_in_one_place():
    assert service.for_platform("darwin") is launchd
    assert service.for_platform("linux") is systemd


def test_cli_install_uninstall_and_status_on_linux(root, commands, capsys):
    commands.answer("systemctl", "show", stdout="ActiveState=inactive\nSubState=dead\nMainPID=0\n")
    assert cli.main(["service-status", "--root", str(root)]) == 3
    assert "vmnet-broker.service: inactive (dead)" in capsys.readouterr().out
    assert cli.main(["install-service", "--root", str(root), "--socket-group", "root", "--exit-idle", "60"]) == 0
    assert "--exit-idle 60" in (root / "etc/systemd/system/vmnet-broker.service").read_text()
    assert "enabled and started vmnet-broker.socket" in capsys.readouterr().out
    assert cli.main(["uninstall-service", "--root", str(root)]) == 0
    assert cli.main(["uninstall-service", "--root", str(root)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "vmnet-broker is not installed"


def test_cli_on_macos_refuses_upstream_and_replace_takes_over(root, commands, capsys, monkeypatch):
    monkeypatch.setattr(service.sys, "platform", "darwin")
    daemons = root / "Library/LaunchDaemons"
    daemons.mkdir(parents=True)
    plist = daemons / "com.github.nirs.vmnet-broker.plist"
    plist.write_bytes(plistlib.dumps(UPSTREAM_PLIST))
    assert cli.main(["install-service", "--root", str(root)]) == 1
    assert "not ours" in capsys.readouterr().err
    label = "com.github.nirs.vmnet-broker"
    assert cli.main(["install-service", "--root", str(root), "--replace", "--label", label]) == 0
    assert plistlib.loads(plist.read_bytes())["ProgramArguments"][0] == sys.executable


def test_without_root_and_on_the_real_root_install_needs_root(monkeypatch, capsys):
    monkeypatch.setattr(service.os, "geteuid", lambda: 1000)
    out = io.StringIO()
    assert service.main("install-service", ServiceOptions(), out=out) == 1
    assert "needs root" in capsys.readouterr().err and out.getvalue() == ""


def test_a_missing_command_is_exit_127_with_its_name():
    proc = run_command(["vmnet-broker-test-no-such-command"])
    assert proc.returncode == 127 and "vmnet-broker-test-no-such-command" in proc.stderr
