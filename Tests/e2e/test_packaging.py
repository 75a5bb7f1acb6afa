"""What culvert ships besides its binary: shell completions generated from its argument
parser, the man pages (culvert.toml(5) documents every key the config parsers read), and
`make install` / `make deb`, which package the binary under test without building one."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO_ROOT, Culvert, EchoServer, echo_once

SHELLS = ["bash", "zsh", "fish"]


def sh(*args: str, cwd: Path | None = None, timeout: float = 300.0, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, errors="replace", cwd=cwd, timeout=timeout, env=env)


# --------------------------------------------------------------------------
# shell completions


@pytest.fixture(scope="module")
def completions(culvert_path, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("completions")
    scripts = {}
    for shell in SHELLS:
        r = sh(culvert_path, "--generate-completion-script", shell)
        assert r.returncode == 0 and r.stderr == "", (shell, r)
        scripts[shell] = out / shell
        scripts[shell].write_text(r.stdout)
    return scripts


@pytest.mark.parametrize("shell", SHELLS)
def test_each_completion_script_knows_every_subcommand(completions, shell):
    text = completions[shell].read_text()
    for word in ("forward", "proxy", "server", "client", "pipe", "token", "check", "--idle-timeout", "--log-format"):
        assert word.lstrip("-") in text, (shell, word)


def test_the_bash_completion_loads_and_completes_subcommands(completions):
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    script = completions["bash"]
    r = sh("bash", "-c", f'source "{script}" && complete -p culvert')
    assert r.returncode == 0 and r.stderr == "", r
    assert re.search(r"-F _culvert culvert$", r.stdout.strip()), r.stdout
    # What bash does on TAB after "culvert for" and after "culvert forward tcp --idle".
    probe = ('source "{s}"; COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE="{line}"; COMP_POINT=${{#COMP_LINE}}; '
             '_culvert culvert "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"; printf "%s\\n" "${{COMPREPLY[@]}}"')
    r = sh("bash", "-O", "extglob", "-c", probe.format(s=script, words="culvert for", cword=1, line="culvert for"))
    assert r.stdout.split() == ["forward"], r
    r = sh("bash", "-O", "extglob", "-c", probe.format(s=script, words="culvert forward tcp --idle", cword=3,
                                                       line="culvert forward tcp --idle"))
    assert "--idle-timeout" in r.stdout.split(), r


def test_the_zsh_completion_loads(completions, tmp_path):
    if shutil.which("zsh") is None:
        pytest.skip("zsh is not installed (the script is still checked for every subcommand above)")
    shutil.copy(completions["zsh"], tmp_path / "_culvert")
    r = sh("zsh", "-f", "-c", f'fpath=("{tmp_path}" $fpath); autoload -U compinit; compinit -u -D; '
                              'autoload -U _culvert; whence -w _culvert')
    assert r.returncode == 0 and "function" in r.stdout, r


def test_the_fish_completion_loads_and_completes_subcommands(completions):
    if shutil.which("fish") is None:
        pytest.skip("fish is not installed (the script is still checked for every subcommand above)")
    r = sh("fish", "--no-config", "-c", f'source "{completions["fish"]}"; complete -C"culvert for"')
    assert r.returncode == 0 and r.stdout.split()[0] == "forward", r


# --------------------------------------------------------------------------
# man pages

MAN_PAGES = [REPO_ROOT / "man" / "culvert.1", REPO_ROOT / "man" / "culvert.toml.5"]


@pytest.mark.parametrize("page", MAN_PAGES, ids=lambda p: p.name)
def test_man_pages_render_without_warnings(page):
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    r = sh("groff", "-man", "-ww", "-z", str(page))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    if shutil.which("man"):
        r = sh("man", "--warnings", "-l", str(page), env={**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": ""})
        assert r.returncode == 0 and r.stderr == "", r.stderr


def function_body(source: str, name: str) -> str:
    """The text between the braces of `func NAME(` in a Swift source."""
    m = re.search(r"\bfunc %s\(" % re.escape(name), source)
    assert m, f"no func {name}: the config readers moved, update this test"
    start = source.index("{", m.end())
    depth = 0
    for i in range(start, len(source)):
        depth += {"{": 1, "}": -1}.get(source[i], 0)
        if depth == 0:
            return source[start:i + 1]
    raise AssertionError(f"unbalanced braces in func {name}")


KEY_READ = re.compile(r'\b(?:string|strings|int|bool|duration|tables)\(\s*"([a-z_]+)"([^)\n]*)')


def keys_read(body: str) -> tuple[set[str], set[str]]:
    """(keys read at the top level, keys read from a sub-table: `in: table`)."""
    top, nested = set(), set()
    for key, rest in KEY_READ.findall(body):
        (nested if "in: table" in rest else top).add(key)
    return top, nested


def parser_keys() -> dict[str, set[str]]:
    """Every key the config parsers read, by the culvert.toml(5) section that documents it."""
    tunnel = (REPO_ROOT / "Sources/Culvert/Config/TunnelConfigFile.swift").read_text()
    forward = (REPO_ROOT / "Sources/Culvert/Forward/ForwardConfigFile.swift").read_text()
    config_file = (REPO_ROOT / "Sources/Culvert/Config/ConfigFile.swift").read_text()
    common, _ = keys_read(function_body(tunnel, "readCommon"))
    server, _ = keys_read(function_body(tunnel, "loadServer"))
    client, client_services = keys_read(function_body(tunnel, "loadClient"))
    _, service_token = keys_read(function_body(config_file, "serviceToken"))
    forward_keys: set[str] = set()
    for name in ("declaredProtocol", "load", "layer", "idleText"):
        top, nested = keys_read(function_body(forward, name))
        forward_keys |= top | nested
    return {
        "SERVER": server | common,
        "CLIENT": client | common,
        "Client [services.NAME] keys": client_services | service_token,
        "FORWARD": forward_keys,
    }


def documented_keys(page: str) -> dict[str, set[str]]:
    """The keys each section (.SH) or subsection (.SS) of a man page lists in its `.TP`
    entries: the words of the entry's tag line, without quoted text."""
    sections: dict[str, set[str]] = {}
    current = None
    lines = page.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r'\.S[HS] "?(.*?)"?$', line)
        if m:
            current = m.group(1)
            sections.setdefault(current, set())
        elif line == ".TP" and current and i + 1 < len(lines):
            tag = re.sub(r'"[^"]*"', " ", lines[i + 1])
            sections[current] |= set(re.findall(r"[a-z_]+", re.sub(r"^\.\w+", "", tag)))
    return sections


def test_culvert_toml_5_documents_every_key_the_parsers_read():
    wanted = parser_keys()
    assert len(wanted["SERVER"]) >= 15 and len(wanted["CLIENT"]) >= 15 and len(wanted["FORWARD"]) >= 12, wanted
    assert {"remote_port", "local", "secret", "token"} <= wanted["Client [services.NAME] keys"], wanted
    documented = documented_keys((REPO_ROOT / "man" / "culvert.toml.5").read_text())
    missing = {section: sorted(keys - documented.get(section, set())) for section, keys in wanted.items()}
    assert not any(missing.values()), f"keys read by the parsers but not in culvert.toml(5): {missing}"


# --------------------------------------------------------------------------
# make install and make deb

EXPECTED_INSTALL = [
    "bin/culvert",
    "share/man/man1/culvert.1",
    "share/man/man5/culvert.toml.5",
    "share/bash-completion/completions/culvert",
    "share/zsh/site-functions/_culvert",
    "share/fish/vendor_completions.d/culvert.fish",
]


def make(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    r = sh("make", "-s", "--no-print-directory", *args, cwd=REPO_ROOT)
    assert r.returncode == 0, r
    return r


def test_make_install_puts_completions_and_man_pages_in_the_usual_places(culvert_path, tmp_path):
    # -o build: install the binary under test instead of building one.
    make("-o", "build", "install", f"BIN={culvert_path}", f"DESTDIR={tmp_path}", "PREFIX=/usr")
    root = tmp_path / "usr"
    for path in EXPECTED_INSTALL:
        assert (root / path).is_file() and (root / path).stat().st_size > 0, path
    assert (root / "share/bash-completion/completions/culvert").read_text() == \
        sh(culvert_path, "--generate-completion-script", "bash").stdout
    make("uninstall", f"DESTDIR={tmp_path}", "PREFIX=/usr")
    assert not [p for p in EXPECTED_INSTALL if (root / p).exists()]


@pytest.fixture(scope="module")
def deb(culvert_path, tmp_path_factory) -> Path:
    for tool in ("dpkg-deb", "dpkg", "strip", "gzip"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    out = tmp_path_factory.mktemp("deb")
    make("deb", f"BIN={culvert_path}", f"DEB_DIR={out}")
    version = sh(culvert_path, "--version").stdout.strip()
    arch = sh("dpkg", "--print-architecture").stdout.strip()
    path = out / f"culvert_{version}_{arch}.deb"
    assert path.is_file(), sorted(p.name for p in out.iterdir())
    return path


def field(deb: Path, name: str) -> str:
    r = sh("dpkg-deb", "--field", str(deb), name)
    assert r.returncode == 0, r
    return r.stdout.strip()


def test_the_deb_is_named_and_described_by_the_binary(culvert_path, deb):
    info = sh("dpkg-deb", "--info", str(deb))
    assert info.returncode == 0, info
    assert field(deb, "Package") == "culvert"
    assert field(deb, "Version") == sh(culvert_path, "--version").stdout.strip()
    assert field(deb, "Architecture") == sh("dpkg", "--print-architecture").stdout.strip()
    assert int(field(deb, "Installed-Size")) > 1000


def test_the_deb_depends_on_every_library_the_binary_loads(culvert_path, deb):
    depends = {d.strip().split()[0] for d in field(deb, "Depends").split(",")}
    libraries = re.findall(r"=> (/\S+)|^\s*(/\S+) \(", sh("ldd", culvert_path).stdout, re.M)
    assert libraries, "ldd found no library"
    for found in libraries:
        library = found[0] or found[1]
        owners = sh("dpkg", "-S", library)
        if owners.returncode != 0:
            owners = sh("dpkg", "-S", os.path.realpath(library))
        assert owners.returncode == 0, (library, owners.stderr)
        package = owners.stdout.split(":")[0]
        assert package in depends, f"{library} comes from {package}, which Depends ({sorted(depends)}) lacks"


def test_the_deb_holds_binary_man_pages_completions_units_and_copyright(deb):
    r = sh("dpkg-deb", "--contents", str(deb))
    assert r.returncode == 0, r
    entries = {}
    for line in r.stdout.splitlines():
        mode, owner, _size, _date, _time, path = line.split(None, 5)
        entries[path.removeprefix(".")] = (mode, owner)
    expected = {
        "/usr/bin/culvert": "-rwxr-xr-x",
        "/usr/share/man/man1/culvert.1.gz": "-rw-r--r--",
        "/usr/share/man/man5/culvert.toml.5.gz": "-rw-r--r--",
        "/usr/share/bash-completion/completions/culvert": "-rw-r--r--",
        "/usr/share/zsh/vendor-completions/_culvert": "-rw-r--r--",
        "/usr/share/fish/vendor_completions.d/culvert.fish": "-rw-r--r--",
        "/lib/systemd/system/culvert-server.service": "-rw-r--r--",
        "/lib/systemd/system/culvert-client@.service": "-rw-r--r--",
        "/usr/share/doc/culvert/copyright": "-rw-r--r--",
    }
    for path, mode in expected.items():
        assert path in entries, (path, sorted(entries))
        assert entries[path][0] == mode, (path, entries[path])
    assert all(owner == "root/root" for _, owner in entries.values()), entries


def test_the_unpacked_deb_runs(culvert_path, deb, tmp_path):
    root = tmp_path / "root"
    r = sh("dpkg-deb", "-x", str(deb), str(root))
    assert r.returncode == 0, r
    binary = root / "usr/bin/culvert"
    assert sh(str(binary), "--version").stdout == sh(culvert_path, "--version").stdout
    # The units start the packaged binary.
    for unit in (root / "lib/systemd/system").iterdir():
        execs = re.findall(r"^ExecStart=(\S+)", unit.read_text(), re.M)
        assert execs == ["/usr/bin/culvert"], (unit.name, execs)
    # The man pages are the tree's, compressed.
    for page in MAN_PAGES:
        section = page.suffix.lstrip(".")
        packed = root / f"usr/share/man/man{section}/{page.name}.gz"
        assert gzip.decompress(packed.read_bytes()) == page.read_bytes(), packed
    # And the binary forwards.
    echo = EchoServer()
    c = Culvert(str(binary), ["forward", "tcp", "127.0.0.1:0", echo.address])
    try:
        host, port = c.wait_ready(1)[0][0].rsplit(":", 1)
        echo_once((host, int(port)), b"from the package")
        assert c.terminate() == 0
    finally:
        c.kill()
        echo.close()
