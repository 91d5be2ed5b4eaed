"""The dashboard over the app (TestClient, real Postgres and Redis, file:// storage): sign-in,
the owner rule on pages, images and live-update routes, the /files guard, escaping, CSRF.

Images are made the way a worker records them (claim, put, record_success) without rendering:
the browser test (tests/e2e/test_dashboard_browser.py) runs a real worker.
"""

from __future__ import annotations

import io
import re
import uuid
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lcmq import access, api
from lcmq.access import Principal
from lcmq.http.auth import SESSION_COOKIE
from lcmq.settings import reset_settings

HOST = "http://testserver"
XSS = "<script>alert('owned')</script> a red fox"


@dataclass
class Key:
    name: str
    key: str

    @property
    def principal(self) -> Principal:
        return Principal(self.name, admin=False)


@pytest.fixture
def file_env(services_env, tmp_path, monkeypatch):
    monkeypatch.setenv("LCMQ_STORAGE_URL", f"file://{tmp_path / 'renders'}")
    reset_settings()
    yield tmp_path / "renders"
    reset_settings()


@pytest.fixture
def app(file_env):
    from lcmq.http.app import create_app

    return create_app(run_background=False)


def new_key(prefix: str) -> Key:
    made = access.create_key(api.repository(), f"{prefix}-{uuid.uuid4().hex[:8]}")
    return Key(made.name, made.key)


def client(app, key: Key | None = None) -> TestClient:
    c = TestClient(app, base_url=HOST, follow_redirects=False)
    if key is not None:
        c.cookies.set(SESSION_COOKIE, key.key)
    return c


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


def rendered_batch(owner: Key, prompts: list[str], fail_last: bool = False) -> str:
    """A batch whose jobs succeeded (an image each at its key) as a worker records them, the
    last one failed when asked."""
    batch_id = api.submit(prompts, model="null", name=f"batch of {owner.name}", principal=owner.principal).batch_id
    repo, store = api.repository(), api.storage()
    jobs = repo.claim([job.id for job in repo.jobs(batch_id)], "test-worker", lease_s=60)
    failing = jobs[-1:] if fail_last else []
    for job in jobs[: len(jobs) - len(failing)]:
        key = store.batch_key(batch_id, job.index)
        store.put(key, png(), "image/png", {})
        assert repo.record_success(job.id, "test-worker", key, "0" * 64, 1.0, 1)
    if failing:
        repo.record_failure([failing[0].id], "test-worker", "CUDA out of memory <b>at step 3</b>")
    return batch_id


def test_without_a_key_every_page_is_the_sign_in_form_and_shows_no_data(app):
    alice = new_key("alice")
    batch_id = rendered_batch(alice, ["a red fox"])
    anonymous = client(app)
    for path in ("/", f"/batches/{batch_id}", "/workers"):
        page = anonymous.get(path)
        assert page.status_code == 401 and "Sign in" in page.text
        assert "batch of" not in page.text and batch_id not in page.text
    for path in (f"/ui/batches/{batch_id}/parts", f"/v1/batches/{batch_id}/events", f"/files/{batch_id}/000000.png"):
        assert anonymous.get(path).status_code == 401
    assert anonymous.post(f"/batches/{batch_id}/cancel", headers={"Origin": HOST}).status_code == 401


def test_the_sign_in_link_sets_the_session_cookie_and_redirects_to_the_clean_url(app):
    alice = new_key("alice")
    rendered_batch(alice, ["a red fox"])
    browser = client(app)
    signed = browser.get(f"/?token={alice.key}&before=")
    assert signed.status_code == 303
    assert signed.headers["location"] == "/?before="
    cookie = signed.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}={alice.key};")
    assert "httponly" in cookie.lower() and "samesite=lax" in cookie.lower() and "secure" not in cookie.lower()
    page = browser.get("/")  # the client keeps the cookie, as a browser does
    assert page.status_code == 200 and f"batch of {alice.name}" in page.text
    assert alice.key not in page.text

    bad = client(app).get("/?token=lcmq_not-a-key")
    assert bad.status_code == 401 and "not valid" in bad.text and "set-cookie" not in bad.headers

    form = client(app).post("/signin", data={"key": alice.key}, headers={"Origin": HOST})
    assert form.status_code == 303 and form.headers["location"] == "/" and SESSION_COOKIE in form.headers["set-cookie"]
    wrong = client(app).post("/signin", data={"key": "nope"}, headers={"Origin": HOST})
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
    out = client(app, alice).get("/signout")
    assert out.status_code == 303 and f'{SESSION_COOKIE}=""' in out.headers["set-cookie"]


def test_the_https_sign_in_cookie_is_secure(file_env):
    from lcmq.http.app import create_app

    alice = new_key("alice")
    secure = TestClient(create_app(run_background=False), base_url="https://testserver", follow_redirects=False)
    assert "secure" in secure.get(f"/?token={alice.key}").headers["set-cookie"].lower()


def test_another_keys_batch_is_not_found_on_every_dashboard_route(app):
    alice, bob = new_key("alice"), new_key("bob")
    batch_id = rendered_batch(alice, ["a red fox", "a blue owl"])
    as_bob = client(app, bob)
    assert batch_id not in as_bob.get("/").text
    page = as_bob.get(f"/batches/{batch_id}")
    assert page.status_code == 404 and "a red fox" not in page.text
    for path in (f"/ui/batches/{batch_id}/parts", f"/v1/batches/{batch_id}/events", f"/files/{batch_id}/000000.png"):
        assert as_bob.get(path).status_code == 404, path
    for action in ("cancel", "retry"):
        assert as_bob.post(f"/batches/{batch_id}/{action}", headers={"Origin": HOST}).status_code == 404

    as_alice = client(app, alice)
    own = as_alice.get(f"/batches/{batch_id}")
    assert own.status_code == 200 and "a blue owl" in own.text
    assert len(re.findall(r'<figure class="thumb"', own.text)) == 2


def test_files_serves_only_images_of_visible_batches_from_under_the_storage_root(app, file_env, tmp_path):
    alice, bob = new_key("alice"), new_key("bob")
    mine = rendered_batch(alice, ["a red fox", "a blue owl"])
    theirs = rendered_batch(bob, ["a green frog"])
    (tmp_path / "secret.txt").write_text("not an image")
    as_alice = client(app, alice)

    image = as_alice.get(f"/files/{mine}/000000.png")
    assert image.status_code == 200 and image.content == png()
    for key in (
        f"{theirs}/000000.png",  # another key's image
        f"{mine}/000007.png",  # no such job
        f"{mine}/%2E%2E/{theirs}/000000.png",  # ../ into another batch
        "..%2Fsecret.txt",
        f"{mine}/..%2F..%2Fsecret.txt",
        "%2Fetc%2Fpasswd",  # an absolute path
        f"{mine}/manifest.jsonl",  # under the root, yet no job's image
    ):
        assert as_alice.get(f"/files/{key}").status_code == 404, key
    # A job's own key whose file is a symlink leading out of the root.
    link = file_env / mine / "000001.png"
    link.unlink()
    link.symlink_to(tmp_path / "secret.txt")
    assert as_alice.get(f"/files/{mine}/000001.png").status_code == 404


def test_user_text_is_escaped_everywhere_it_is_shown(app):
    alice = new_key("alice")
    batch_id = rendered_batch(alice, [XSS, XSS + " again"], fail_last=True)
    as_alice = client(app, alice)
    for path in (f"/batches/{batch_id}", f"/ui/batches/{batch_id}/parts"):
        text = as_alice.get(path).text
        assert "<script>alert" not in text and "<b>at step 3" not in text
        assert "&lt;script&gt;alert(&#39;owned&#39;)&lt;/script&gt;" in text  # caption, alt, failures
        assert "CUDA out of memory &lt;b&gt;at step 3&lt;/b&gt;" in text
    headers = as_alice.get(f"/batches/{batch_id}").headers
    assert "script-src 'self'" in headers["content-security-policy"]


def test_state_changing_buttons_need_a_same_origin_post(app):
    alice = new_key("alice")
    batch_id = api.submit(["a red fox", "a blue owl"], model="null", principal=alice.principal).batch_id
    as_alice = client(app, alice)
    for headers in ({}, {"Origin": "http://evil.example"}, {"Referer": "http://evil.example/batches"}):
        assert as_alice.post(f"/batches/{batch_id}/cancel", headers=headers).status_code == 403
    assert api.status(batch_id).canceled == 0
    done = as_alice.post(f"/batches/{batch_id}/cancel", headers={"Referer": f"{HOST}/batches/{batch_id}"})
    assert done.status_code == 303 and done.headers["location"] == f"/batches/{batch_id}"
    assert api.status(batch_id).canceled == 2


def test_the_batches_page_shows_images_per_second_of_the_last_minute(app):
    alice = new_key("alice")
    busy = rendered_batch(alice, ["a", "b", "c"])
    idle = api.submit(["d"], model="null", principal=alice.principal).batch_id
    listed = api.batches(principal=alice.principal)
    rates = api.images_per_second(listed, principal=alice.principal)
    assert rates[busy] > 0 and rates[idle] == 0
    assert api.images_per_second(listed, principal=new_key("bob").principal)[busy] == 0  # not bob's
    page = client(app, alice).get("/")
    assert page.status_code == 200 and "Images/s" in page.text and f"/batches/{busy}" in page.text


def test_the_workers_page_shows_each_worker_and_its_cost_per_1000_images(app, monkeypatch):
    alice = new_key("alice")
    if not hasattr(api, "workers"):  # this build has no worker rows: the page says so
        assert "No worker data" in client(app, alice).get("/workers").text
    seen = "2026-01-01T00:00:00+00:00"
    rows = [
        {"node": "w1@gpu-a", "host": "gpu-a", "profile": "tiny", "device": "cuda:0", "batch_size": 8, "images": 900,
         "images_per_s": 3.0, "cost_per_hour": 2.5, "cost_per_1000_images": 0.2315, "last_seen_at": seen,
         "state": "live"},
        {"node": "w2@cpu-b", "host": "cpu-b", "profile": "tiny", "device": "cpu", "batch_size": None, "images": 0,
         "images_per_s": None, "cost_per_hour": None, "cost_per_1000_images": None, "last_seen_at": seen,
         "state": "stale"},
    ]  # fmt: skip
    monkeypatch.setattr(api, "workers", lambda: rows, raising=False)  # the shape lcmq.api.workers returns
    page = client(app, alice).get("/workers")
    assert page.status_code == 200
    assert "w1@gpu-a" in page.text and "cuda:0" in page.text and "0.2315" in page.text and "3.00" in page.text
    assert 'class="badge stale"' in page.text and 'class="badge live"' in page.text
