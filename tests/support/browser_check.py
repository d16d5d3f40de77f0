#!/usr/bin/env python3
"""The page of `runner serve` in a real headless Chromium (Debian's chromium + chromedriver,
driven by selenium), against a server tests/serve.rs started with a token and the step gate:

  browser_check.py PORT TOKEN GATE_DIR OUT_DIR [SCREENSHOT]

Asks for the token once; fills the form; sees the progress bar advance step by step (the test
opens the gate one step at a time); gets the image and writes the PNG its download link holds to
OUT_DIR/page.png (the Rust test compares it with `runner run`'s); checks that HTML in a prompt is
shown as text and never run; that a bad field's message appears next to that field; that
"Use this seed" fills the seed; that Cancel stops a running job. Prints a line per check.
"""
import base64
import os
import pathlib
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

port, token, gate, out = sys.argv[1:5]
screenshot = sys.argv[5] if len(sys.argv) > 5 else None
gate = pathlib.Path(gate)
url = f"http://127.0.0.1:{port}/"

opts = webdriver.ChromeOptions()
opts.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900", "--no-first-run", "--disable-extensions"]:
    opts.add_argument(a)
driver = webdriver.Chrome(service=Service(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")), options=opts)
wait = WebDriverWait(driver, 60)


def el(i):
    return driver.find_element(By.ID, i)


def set_value(i, v):
    e = el(i)
    e.clear()
    e.send_keys(v)


def progress():
    return driver.execute_script("const p = document.getElementById('progress'); return [p.hasAttribute('value') ? p.value : null, p.max];")


def close_gate():
    for f in gate.iterdir():
        f.unlink()


try:
    driver.get(url)
    # The token, asked once, kept in sessionStorage.
    wait.until(EC.visibility_of_element_located((By.ID, "token")))
    el("token").send_keys(token)
    el("token-save").click()
    wait.until(lambda d: "tiny-sd15" in el("model").text)
    assert "stable-diffusion" in el("model").text, el("model").text
    assert driver.execute_script("return sessionStorage.getItem('runner-token')") == token
    print("token: asked once, kept in sessionStorage; model:", el("model").text)

    # Every control has a label.
    unlabelled = driver.execute_script(
        "return [...document.querySelectorAll('input, textarea')].filter(e => !(e.labels && e.labels.length)).map(e => e.id)"
    )
    assert not unlabelled, unlabelled

    # A generation, its progress bar advancing one step at a time (the gate is closed).
    prompt = 'a <img src=x onerror="window.__xss = 1"> cat <script>window.__xss = 2</script>'
    set_value("prompt", prompt)
    set_value("negative_prompt", "blurry")
    set_value("width", "64")
    set_value("height", "64")
    set_value("steps", "3")
    set_value("guidance_scale", "5")
    el("random_seed").click()
    set_value("seed", "7")
    el("generate").click()
    # (PNDM runs one more denoiser call than steps: the bar counts calls, as the server does.)
    wait.until(lambda d: progress()[0] == 0 and progress()[1] > 1)
    n = progress()[1]
    seen = []
    for step in range(n):
        (gate / f"step-{step}").write_text("")
        wait.until(lambda d: (progress()[0] or 0) >= step + 1 or el("result").is_displayed())
        seen.append((progress()[0], el("status").text))
    print("progress:", seen)
    assert [s[0] for s in seen][: n - 1] == list(range(1, n)), seen
    assert any("steps/s" in s[1] and "left" in s[1] for s in seen), seen
    wait.until(lambda d: el("result").is_displayed())
    # The download link's PNG, as the browser holds it.
    b64 = driver.execute_async_script(
        """const done = arguments[arguments.length - 1];
        fetch(document.getElementById('download').href).then(r => r.arrayBuffer()).then(b => {
          let s = ''; const a = new Uint8Array(b); for (let i = 0; i < a.length; i++) s += String.fromCharCode(a[i]); done(btoa(s)); });"""
    )
    pathlib.Path(out, "page.png").write_bytes(base64.b64decode(b64))
    assert el("download").get_attribute("download") == "tiny-sd15-7.png", el("download").get_attribute("download")
    print("image: downloaded", len(base64.b64decode(b64)), "bytes")

    # HTML in the prompt is text on the page, never run.
    assert driver.execute_script("return window.__xss") is None
    assert "<img src=x" in el("settings").text and "<script>" in el("history").text, el("settings").text
    assert driver.find_elements(By.CSS_SELECTOR, "#settings img, #history script, #settings script") == []
    print("prompt HTML: shown as text, not run")

    # "Use this seed".
    el("random_seed").click()
    assert el("seed").get_attribute("value") == ""
    el("use-seed").click()
    assert el("seed").get_attribute("value") == "7" and not el("random_seed").is_selected()
    print("use this seed: 7")

    # A bad field: the server's message next to it.
    set_value("steps", "99")
    el("generate").click()
    wait.until(lambda d: el("steps-error").text != "")
    assert "max_steps" in el("steps-error").text and el("steps").get_attribute("aria-invalid") == "true", el("steps-error").text
    print("bad field:", el("steps-error").text)

    # Cancel stops a running job.
    close_gate()
    set_value("steps", "3")
    el("generate").click()
    wait.until(lambda d: progress()[0] == 0 and progress()[1] > 1)
    el("cancel").click()
    wait.until(lambda d: el("status").text == "Cancelled")
    assert not el("generate").get_attribute("disabled")
    print("cancel: cancelled")

    # A phone's width: nothing wider than the screen (no sideways scrolling), controls stacked.
    driver.set_window_size(390, 844)
    time.sleep(0.3)
    wide = driver.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert wide[0] <= wide[1], wide
    assert el("prompt").size["width"] <= wide[1], el("prompt").size
    driver.set_window_size(1200, 900)
    print("phone width: fits", wide)

    # Every request the page made went to its own origin (the token with it).
    others = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name).filter(u => !u.startsWith(location.origin + '/') && !u.startsWith('blob:') && !u.startsWith('data:'))"
    )
    assert others == [], others
    print("requests: this origin only")

    if screenshot:
        # The README's picture: one more image, from a plain prompt, the gate open.
        (gate / "open").write_text("")
        set_value("prompt", "a photo of a cat")
        set_value("negative_prompt", "blurry")
        el("random_seed").click() if not el("random_seed").is_selected() else None
        el("generate").click()
        wait.until(lambda d: el("status").text.startswith("Done"))
        driver.execute_script("document.getElementById('image').style.width = '256px'; document.getElementById('image').style.imageRendering = 'pixelated';")
        driver.save_screenshot(screenshot)
        print("screenshot:", screenshot)
finally:
    logs = []
    try:
        logs = [l for l in driver.get_log("browser") if l["level"] == "SEVERE"]
    except Exception:
        pass
    driver.quit()
    if logs:
        print("browser errors:", logs)
