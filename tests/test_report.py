"""``kmim report``: the page and its PNGs from real datasets (local and S3), the nearest-patch rule checked by brute
force, escaping of dataset strings, the files read, the CLI, and the page rendered in headless Chromium.

Chromium comes from Debian's package (``scripts/setup.sh --test`` installs it) and is driven over its DevTools
protocol on 127.0.0.1 with websocket-client: nothing is downloaded at test time. Without Chromium the browser test
fails, unless ``KMIM_SKIP_BROWSER=1`` says to skip it. Its screenshot is written under the test's tmp_path and
copied to ``$KMIM_TEST_ARTIFACTS`` when set.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import job_overrides, make_image_folder, moto_s3
from PIL import Image
from typer.testing import CliRunner

from kmim.cli import app
from kmim.config import load_config
from kmim.datasets.codebook import load_codebook
from kmim.datasets.loader import TokenDataset
from kmim.datasets.manifest import read_manifest
from kmim.pipeline.job import fit_job, run_job
from kmim.report import build_report
from kmim.report.gallery import Nearest
from kmim.tokenizers.extractors import PixelExtractor

HOSTILE = "class_<img src=x onerror=\"alert(1)\"> & $x$ 'q'"  # a class name: a folder name, so no '/'


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes (one with a hostile name), 2 views per image, fitted with kmim fit first (so a fit report)."""
    images = make_image_folder(tmp_path_factory.mktemp("images"), per_class=6)
    (images / "class_1").rename(images / HOSTILE)
    out = tmp_path_factory.mktemp("labelled") / "ds"
    cfg = load_config(None, job_overrides(out=str(out), input=str(images), views=2, view_scale="0.3,0.9"))
    fit_job(cfg)
    run_job(cfg)
    return out


@pytest.fixture(scope="module")
def flat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Unlabelled solid-colour images (3 colours, K=8: 5 dead codes), made by kmim run alone (no fit report)."""
    images = tmp_path_factory.mktemp("flat")
    for i in range(12):
        colour = [(250, 20, 20), (20, 250, 20), (20, 20, 250)][i % 3]
        Image.fromarray(np.full((40, 48, 3), colour, np.uint8)).save(images / f"{i}.png")
    out = tmp_path_factory.mktemp("flatds") / "ds"
    run_job(load_config(None, job_overrides(out=str(out), input=str(images))))
    return out


@pytest.fixture(scope="module")
def report(labelled: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_report(str(labelled), tmp_path_factory.mktemp("report"), samples=4, per_code=5)


class Page(HTMLParser):
    """The page's elements as (tag, attributes)."""

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.elements.append((tag, dict(attrs)))

    def all(self, tag: str, cls: str | None = None) -> list[dict]:
        return [a for t, a in self.elements if t == tag and (cls is None or cls in a.get("class", "").split())]


def test_report_files_links_and_sections(report: Path, labelled: Path) -> None:
    html = report.read_text()
    page = Page(html)
    k = read_manifest(labelled)["codebook"]["k"]
    assert report.name == "index.html"
    links = [a["src"] for a in page.all("img")] + [a["href"] for a in page.all("a")]
    assert all(not re.match(r"[a-z]+:|//", link) for link in links), "every link is relative"
    assert not page.all("script") and not page.all("link")
    for src in {a["src"] for a in page.all("img")}:
        assert (report.parent / src).is_file(), src
    assert {"usage.png", "classes.png", "inertia.png"} <= {p.name for p in (report.parent / "assets").iterdir()}
    cards = page.all("div", "code")
    assert len(cards) == k
    usage = [int(n) for n in re.findall(r"<b>code \d+</b> · (\d+) patches", html)]
    assert len(usage) == k and usage == sorted(usage, reverse=True)
    assert sum(usage) == 18 * 2 * 16  # images x views x patches per view
    assert "nearest to its centroid" in html and "From fit-report.json" in html
    assert sum("-tokens.png" in a["src"] for a in page.all("img")) == 4 * 2  # 4 samples x 2 views


def test_dataset_strings_are_escaped(report: Path) -> None:
    html = report.read_text()
    assert "<img src=x" not in html and 'onerror="alert' not in html
    assert "class_&lt;img src=x onerror=&quot;alert(1)&quot;&gt; &amp; $x$ &#x27;q&#x27;" in html


def _titles(html: str, code: int) -> list[tuple[str, int, int, int]]:
    """(key, view, row, column) of the gallery patches of ``code``, in page order."""
    card = re.search(rf'id="code-{code}">(.*?)</div></div>', html, re.S).group(1)
    return [(m[0], int(m[1]), int(m[2]), int(m[3]))
            for m in re.findall(r'title="([0-9a-f]+) · view (\d+) · row (\d+), column (\d+)', card)]


def test_gallery_holds_the_patches_nearest_each_centroid(report: Path, labelled: Path) -> None:
    """Brute force over every patch of every view: features recomputed from the loader's pixels."""
    book = load_codebook(labelled / "codebook.safetensors")
    meta = book.metadata
    extractor = PixelExtractor(meta["patch_size"], meta["normalize"], meta["norm_pix"])
    ds = TokenDataset(labelled, batch_size=1, shuffle=False, drop_last=False, mean=(0, 0, 0), std=(1, 1, 1))
    found: dict[int, list[tuple[float, tuple]]] = {}
    for i in range(int(ds.offsets[-1])):
        for view in range(2):
            s = ds.sample(i, view)
            pixels = torch.round(s["image"] * 255).to(torch.uint8)[None]
            feats = extractor(pixels)[0]
            dist = ((feats - book.centroids[s["tokens"]]) ** 2).sum(-1)
            for (r, c), t in np.ndenumerate(s["tokens"].numpy()):
                found.setdefault(int(t), []).append((float(dist[r, c]), (s["key"], view, r, c)))
    html = report.read_text()
    for code, patches in found.items():
        expected = [where for _, where in sorted(patches, key=lambda p: p[0])[:5]]
        assert _titles(html, code) == expected, code


def test_no_labels_no_fit_report_dead_codes_and_bounds(flat: Path, tmp_path: Path) -> None:
    html = build_report(str(flat), tmp_path / "r", samples=2, per_code=3, max_codes=4, max_images=5).read_text()
    page = Page(html)
    assert "No token-by-class matrix" in html and "No fit-report.json in the dataset" in html
    cards = page.all("div", "code")
    assert len(cards) == 4 and sum("dead" in c["class"] for c in cards) == 1  # 3 used codes, then a dead one
    assert "dead: no patch carries this code" in html and "the 4 most used of 8 codes" in html
    assert "in the 5 scanned samples" in html and html.count('class="sample"') == 2
    assert not (tmp_path / "r" / "assets" / "classes.png").exists()


def test_reads_only_the_manifest_its_files_and_the_fit_report(labelled: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A stray shard-like file beside the dataset is never opened; every listed shard is."""
    from fsspec.implementations.local import LocalFileSystem

    opened: list[str] = []
    real = LocalFileSystem._open

    def spy(self, path, *args, **kwargs):
        opened.append(str(path))
        return real(self, path, *args, **kwargs)

    stray = tmp_path / "ds"
    shutil.copytree(labelled, stray)
    (stray / "stray.tar").write_bytes(b"not part of the dataset")
    monkeypatch.setattr(LocalFileSystem, "_open", spy)
    build_report(str(stray), tmp_path / "r", samples=1)
    manifest = read_manifest(labelled)
    allowed = {"manifest.json", "fit-report.json", manifest["codebook"]["path"],
               *(e["path"] for e in manifest["shards"]), *(e["index"] for e in manifest["shards"])}
    read = {Path(p).name for p in opened if Path(p).parent == stray}
    assert read and read <= allowed, read - allowed
    assert {e["path"] for e in manifest["shards"]} <= read


def test_learned_extractor_ranks_with_its_weights_else_samples(tmp_path: Path) -> None:
    """A tiny DINO ViT: with the codebook's weights the patches are ranked by distance; with other weights they are
    a deterministic sample, and the page says why."""
    from test_learned_extractors import VIT16, save_tiny

    images = make_image_folder(tmp_path / "images", per_class=3)
    weights = save_tiny(tmp_path / "w.safetensors", VIT16)
    other = save_tiny(tmp_path / "other.safetensors", VIT16, seed=1)
    out = tmp_path / "ds"
    run_job(load_config(None, job_overrides(out=str(out), input=str(images), extractor="dino", model=VIT16[1],
                                            model_kwargs=json.dumps(VIT16[2]), weights=str(weights), k=6)))
    ranked = build_report(str(out), tmp_path / "a", weights=str(weights), samples=1).read_text()
    assert "nearest to its centroid" in ranked and "with the dino extractor" in ranked
    sampled = [build_report(str(out), tmp_path / f"b{i}", weights=str(other), samples=1).read_text() for i in (0, 1)]
    assert "deterministic sample" in sampled[0]
    assert "differs from the codebook&#x27;s in &#x27;weights_digest" in sampled[0]
    assert sampled[0] == sampled[1]


def test_report_of_an_s3_dataset_matches_the_local_one(labelled: Path, report: Path, tmp_path: Path) -> None:
    import s3fs

    with moto_s3("kmim-report-secret") as endpoint:
        import boto3

        boto3.client("s3").create_bucket(Bucket="reports")
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.put(str(labelled), "reports/ds", recursive=True)
        remote = build_report("s3://reports/ds", tmp_path / "r", samples=4, per_code=5,
                              storage_options={"endpoint_url": endpoint})
        s3fs.S3FileSystem.clear_instance_cache()
    assert remote.read_text().replace("s3://reports/ds", str(labelled)) == report.read_text()
    pngs = sorted(p.relative_to(report.parent) for p in (report.parent / "assets").rglob("*.png"))
    assert pngs == sorted(p.relative_to(remote.parent) for p in (remote.parent / "assets").rglob("*.png"))
    for rel in pngs:
        assert (report.parent / rel).read_bytes() == (remote.parent / rel).read_bytes(), rel


def test_a_second_report_in_the_same_folder_removes_the_first_ones_images(labelled: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    build_report(str(labelled), out, samples=4, per_code=2)
    (out / "assets" / "notes.txt").write_text("mine")
    (out / "assets" / "maps" / "mine.png").write_bytes(b"not a report image")
    first = {p.relative_to(out) for p in out.rglob("*.png")}
    html = build_report(str(labelled), out, samples=1, per_code=2, max_codes=3).read_text()
    linked = set(re.findall(r'src="(assets/[^"]+)"', html))
    left = {str(p.relative_to(out)) for p in out.rglob("*.png")}
    assert left == linked | {"assets/maps/mine.png"} and len(first) > len(left)
    assert (out / "assets" / "notes.txt").read_text() == "mine"


def test_cli_report_and_its_errors(flat: Path, tmp_path: Path) -> None:
    cli = CliRunner()
    ok = cli.invoke(app, ["report", str(flat), "--out", str(tmp_path / "r"), "--samples", "1", "--per-code", "2"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "r" / "index.html").is_file()
    missing = cli.invoke(app, ["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "r2")])
    assert missing.exit_code == 1
    assert "error" in missing.output and "manifest.json: no manifest" in missing.output
    assert "Traceback" not in missing.output


def test_nearest_keeps_the_per_code_best_whatever_the_chunks() -> None:
    rng = np.random.default_rng(0)
    n, k, per_code = 500, 7, 4
    score, token = rng.random(n), rng.integers(0, k, n)
    ref = np.stack([np.arange(n)] * 4, axis=1)
    patches = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 2, 2, 3))
    kept = Nearest(per_code, 2)
    for lo in range(0, n, 37):
        kept.add(score[lo:lo + 37], token[lo:lo + 37], ref[lo:lo + 37], patches[lo:lo + 37])
    for code in range(k):
        expected = [i for i in np.argsort(score) if token[i] == code][:per_code]
        got = kept.of(code)
        assert kept.ref[got, 0].tolist() == expected
        assert kept.patches[got, 0, 0, 0].tolist() == [i % 256 for i in expected]


# --- headless Chromium over the DevTools protocol ---------------------------------------------------------------


class DevTools:
    """A minimal DevTools protocol client: one websocket to the browser, commands to one page's flat session."""

    def __init__(self, url: str):
        import websocket

        self.ws = websocket.create_connection(url, timeout=60, suppress_origin=True)
        self.events: list[dict] = []
        self.next_id = 0
        self.session: str | None = None

    def send(self, method: str, params: dict | None = None) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if self.session is not None:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events:
                if event.get("method") == method:
                    return event
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(f"no {method} within {timeout}s")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and browser log errors (failed loads) seen so far."""
        found = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.exceptionThrown":
                found.append(f"exception: {p['exceptionDetails'].get('text')} {p['exceptionDetails'].get('exception')}")
            elif e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                found.append(f"console.{p['type']}: {p.get('args')}")
            elif e.get("method") == "Log.entryAdded" and p["entry"].get("level") == "error":
                found.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        return found


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("KMIM_SKIP_BROWSER") == "1":
        pytest.skip("KMIM_SKIP_BROWSER=1: the report is not rendered in a browser")
    pytest.fail("Chromium is not installed, so the report cannot be rendered: run `bash scripts/setup.sh --test` "
                "(apt-get install chromium), or set KMIM_SKIP_BROWSER=1 to skip this check explicitly")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[DevTools]:
    """Headless Chromium with its DevTools endpoint on 127.0.0.1 (a free port), attached to a blank page."""
    binary, profile, log = _chromium(), tmp_path / "chromium-profile", tmp_path / "chromium.log"
    # stderr to a file, not a pipe: Chromium's chatter must never fill a pipe nobody reads and block it.
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [binary, "--headless", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
             "--disable-sync", "--disable-component-update", "--hide-scrollbars", "--mute-audio", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 60
            while not (port_file.is_file() and len(port_file.read_text().splitlines()) >= 2):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"Chromium did not start: {log.read_text(errors='replace')[-2000:]}")
                time.sleep(0.05)
            port, path = port_file.read_text().splitlines()[:2]
            tools = DevTools(f"ws://127.0.0.1:{port}{path}")
            target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            tools.session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                tools.send(f"{domain}.enable")
            yield tools
            tools.ws.close()
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_report_renders_in_headless_chromium(report: Path, browser: DevTools, tmp_path: Path) -> None:
    browser.send("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 900, "deviceScaleFactor": 1,
                                                        "mobile": False})
    browser.send("Page.navigate", {"url": report.resolve().as_uri()})
    browser.wait_for("Page.loadEventFired")
    state = browser.send("Runtime.evaluate", {"returnByValue": True, "expression": """JSON.stringify({
        images: Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]),
        gallery: document.querySelectorAll('.strip img').length,
        injected: document.querySelectorAll('img[onerror]').length,
        height: document.documentElement.scrollHeight})"""})["result"]["value"]
    state = json.loads(state)
    assert browser.errors() == []
    requests = [e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"]
    assert requests and all(url.startswith("file://") for url in requests), requests
    assert state["gallery"] > 0 and state["injected"] == 0
    broken = [src for src, complete, width in state["images"] if not (complete and width > 0)]
    assert not broken, f"images that did not load: {broken}"
    height = min(state["height"], 12000)  # the whole page, up to a size any viewer opens
    shot = base64.b64decode(browser.send("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1}})["data"])
    (tmp_path / "report-screenshot.png").write_bytes(shot)
    assert Image.open(tmp_path / "report-screenshot.png").size == (1280, height)
    if os.environ.get("KMIM_TEST_ARTIFACTS"):
        artifacts = Path(os.environ["KMIM_TEST_ARTIFACTS"])
        artifacts.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "report-screenshot.png", artifacts / "report-screenshot.png")
