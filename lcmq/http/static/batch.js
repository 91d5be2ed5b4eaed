// A batch page's live updates: the counts and progress bar from the events stream, and, when
// the succeeded or failed count changes, the page's gallery and failures refetched as HTML
// (escaped by the server) and merged in. A click on a thumbnail shows what made the image.
"use strict";

(() => {
  const main = document.getElementById("batch");
  if (!main) return;
  const batch = main.dataset.batch;
  const partsUrl = `/ui/batches/${encodeURIComponent(batch)}/parts?after=${main.dataset.after}`;
  const seen = { succeeded: Number(main.dataset.succeeded), failed: Number(main.dataset.failed) };
  let fetching = false;
  let fetchAgain = false;

  function showCounts(status) {
    for (const el of main.querySelectorAll("[data-count]")) el.textContent = status[el.dataset.count];
    const finished = status.succeeded + status.failed + status.canceled;
    const bar = document.getElementById("progress");
    bar.max = status.total;
    bar.value = finished;
    const percent = status.total ? Math.floor((100 * finished) / status.total) : 100;
    document.getElementById("percent").textContent = `${percent}%`;
    document.getElementById("retry-form").hidden = status.failed === 0;
  }

  function figures(root) {
    return [...root.querySelectorAll("figure[data-index]")];
  }

  // Images finish out of row order: each new one goes before the first shown with a higher row.
  function mergeGallery(fresh) {
    const gallery = document.getElementById("gallery");
    const shown = new Set(figures(gallery).map((f) => f.dataset.index));
    for (const figure of figures(fresh)) {
      if (shown.has(figure.dataset.index)) continue;
      const index = Number(figure.dataset.index);
      const next = figures(gallery).find((f) => Number(f.dataset.index) > index) || null;
      gallery.insertBefore(document.importNode(figure, true), next);
    }
  }

  async function refetchParts() {
    if (fetching) {
      fetchAgain = true;
      return;
    }
    fetching = true;
    try {
      const response = await fetch(partsUrl, { credentials: "same-origin" });
      if (!response.ok) return;
      const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
      mergeGallery(fresh.getElementById("gallery"));
      for (const id of ["pager", "failures"]) {
        document.getElementById(id).replaceWith(document.importNode(fresh.getElementById(id), true));
      }
    } finally {
      fetching = false;
      if (fetchAgain) {
        fetchAgain = false;
        refetchParts();
      }
    }
  }

  function onStatus(event) {
    const status = JSON.parse(event.data);
    showCounts(status);
    if (status.succeeded !== seen.succeeded || status.failed !== seen.failed) {
      seen.succeeded = status.succeeded;
      seen.failed = status.failed;
      refetchParts();
    }
  }

  if (main.dataset.done !== "true") {
    const source = new EventSource(`/v1/batches/${encodeURIComponent(batch)}/events`)  // the cookie authenticates it;
    source.addEventListener("status", onStatus);
    source.addEventListener("done", (event) => {
      source.close(); // the stream ends after `done`: no reconnect
      onStatus(event);
      document.getElementById("cancel-form").hidden = true;
      main.dataset.done = "true";
    });
  }

  function field(list, name, value) {
    const term = document.createElement("dt");
    term.textContent = name;
    const text = document.createElement("dd");
    text.textContent = typeof value === "object" ? JSON.stringify(value) : String(value);
    list.append(term, text);
  }

  main.addEventListener("click", (event) => {
    const figure = event.target.closest("figure[data-details]");
    if (!figure) return;
    const details = JSON.parse(figure.dataset.details);
    document.getElementById("details-image").src = figure.querySelector("img").src;
    const list = document.getElementById("details-fields");
    list.replaceChildren();
    for (const [name, value] of Object.entries(details)) {
      if (value !== "" && value !== null) field(list, name.replaceAll("_", " "), value);
    }
    document.getElementById("details").showModal();
  });
})();
