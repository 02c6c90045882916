"""The worked example in docs/copytools.md, installed the way the doc says (an entry point in
``panda.copytools``) and run through copytools.load and run_transfer in a fresh interpreter."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "copytools.md"


def _blocks() -> dict[str, str]:
    """The doc's python blocks, keyed by their first line ('# file: x.py', '# setup.py')."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    return {b.splitlines()[0].strip(): b for b in blocks}


def test_documented_example_tool_installs_and_transfers(tmp_path):
    blocks = _blocks()
    module_block = next(b for k, b in blocks.items() if k.startswith("# file:"))
    module_name = module_block.splitlines()[0].split(":", 1)[1].strip()
    (tmp_path / module_name).write_text(module_block)
    setup_block = blocks["# setup.py"]
    entry = re.search(r'"(\w+ = [\w.]+:\w+)"', setup_block).group(1)
    tool_name = entry.split("=")[0].strip()
    # what `pip install` of a distribution with that entry point leaves on sys.path
    dist = tmp_path / "linktool_example-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: linktool-example\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[panda.copytools]\n{entry}\n")

    script = textwrap.dedent(f"""
        import os, sys, zlib
        import copytools
        from copytools import Transfer, TransferError, run_transfer
        from panda_core.errorcodes import ErrorCode
        tmp = sys.argv[1]
        assert {tool_name!r} in copytools.available(), copytools.available()
        tool = copytools.load({tool_name!r})
        data = os.urandom(100000)
        src = os.path.join(tmp, "out.bin")
        open(src, "wb").write(data)
        ad = "%08x" % (zlib.adler32(data) & 0xffffffff)
        url = "file://" + os.path.join(tmp, "se", "user", "out.bin")
        res = run_transfer(tool, Transfer("out.bin", "user", url, src), "out", 10, 0)
        assert res.adler32 == ad and res.fsize == len(data), res
        os.makedirs(os.path.join(tmp, "work"))
        local = os.path.join(tmp, "work", "out.bin")
        res = run_transfer(tool, Transfer("out.bin", "user", url, local, len(data), "ad:" + ad),
                           "in", 10, 0)
        assert open(local, "rb").read() == data
        try:
            run_transfer(tool, Transfer("no.bin", "user", url + "x", local + "x"), "in", 10, 2, 0)
        except TransferError as exc:
            assert exc.code == ErrorCode.MISSING_INPUT, exc
        else:
            raise AssertionError("missing file not reported")
        try:
            tool.stage_in(Transfer("../x", "user", url, local))
        except TransferError as exc:
            assert exc.code == ErrorCode.HOSTILE_FILE_NAME
        else:
            raise AssertionError("hostile name accepted")
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), str(DOC.parents[1])] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
