"""The curl examples of docs/serving.md (the README's serving page), run as written against a real
`mmr serve` on 127.0.0.1, with a photo of several megabytes (a body built on the command line
fails past ~128 KB)."""

import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SERVING = Path(__file__).resolve().parents[3] / "docs" / "serving.md"


def curl_examples() -> list[str]:
    """The serving page's bash blocks that call the server with curl."""
    blocks = re.findall(r"```bash\n(.*?)```", SERVING.read_text(), flags=re.DOTALL)
    return [b for b in blocks if "localhost:8000" in b and re.search(r"^\s*curl |\|\s*\n\s*curl ", b, flags=re.MULTILINE)]


def big_photo(path: Path) -> Path:
    """A noisy 2000x1500 JPEG: several MB, like a phone's photo."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (1500, 2000, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    path.write_bytes(buf.getvalue())
    return path


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("bash") is None, reason="needs curl and bash")
def test_readme_curl_examples_work_with_a_real_photo(tmp_path):
    from mm_retrieval.server.testing import serve_demo

    examples = curl_examples()
    assert examples, "docs/serving.md lost its curl examples"
    photo = big_photo(tmp_path / "photo.jpg")
    assert photo.stat().st_size > 3_000_000
    with serve_demo(tmp_path / "demo", rerank=False) as (server, _demo):
        for example in examples:
            script = example.replace("localhost:8000", f"{server.host}:{server.port}")
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
            assert done.returncode == 0, f"{example}\n{done.stderr}"
            doc = json.loads(done.stdout)
            assert doc.get("hits"), f"{example}\n{done.stdout[:500]}"
