"use strict";
// The contact sheet: cards built from the embedded JSON, one page at a time, so that a run of
// 10,000 videos keeps a few hundred elements in the page. User data only ever goes into
// textContent and attributes, never into HTML.
(function () {
  const PAGE_SIZE = 200;
  const embedded = document.getElementById("report-data");
  const data = JSON.parse(embedded.textContent);
  embedded.remove(); // the parsed copy is enough: at 10,000 videos the text is ~20 MB
  const videos = data.videos;
  videos.forEach(function (v, i) { v.order = i; });
  const state = { filter: "all", query: "", slow: data.slow_threshold, order: "run", page: 0 };
  const sheet = document.getElementById("sheet");
  const slowInput = document.getElementById("slow");
  if (state.slow !== null) slowInput.value = state.slow.toFixed(2);

  function isSlow(v) {
    return state.slow !== null && v.seconds !== null && v.seconds >= state.slow;
  }
  const filters = {
    all: function () { return true; },
    failed: function (v) { return v.status === "failed"; },
    slow: isSlow,
    unfinished: function (v) { return v.status === "pending" || v.status === "running"; },
  };
  const orders = {
    run: function (a, b) { return a.order - b.order; },
    slowest: function (a, b) { return (b.seconds || 0) - (a.seconds || 0); },
    gpu: function (a, b) { return (b.gpu_seconds || 0) - (a.gpu_seconds || 0); },
    id: function (a, b) { return a.id < b.id ? -1 : a.id > b.id ? 1 : 0; },
  };

  function matches(v) {
    if (!state.query) return true;
    const q = state.query;
    return [v.id, v.prompt, v.error || ""].some(function (s) { return s.toLowerCase().indexOf(q) >= 0; });
  }

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function seconds(x) { return x === null ? "–" : x.toFixed(1) + " s"; }

  function card(v) {
    const box = el("div", "card " + v.status + (isSlow(v) ? " slow" : ""));
    box.title = v.id + "\n" + v.prompt + "\nseed " + v.seed + ", shard " + v.shard;
    let picture;
    if (v.thumb) {
      picture = el("img");
      picture.loading = "lazy";
      picture.decoding = "async";
      picture.alt = v.id;
      picture.src = "data:image/jpeg;base64," + v.thumb;
    } else {
      picture = el("div", "noimg", v.status);
    }
    if (v.href) {
      const link = el("a");
      link.href = v.href;
      link.appendChild(picture);
      box.appendChild(link);
    } else {
      box.appendChild(picture);
    }
    if (v.input_thumb) {  // image-to-video: the input image beside the video's first frame
      const input = el("img", "input");
      input.alt = "input image";
      input.title = "input image: " + (v.image_source || "");
      input.src = "data:image/jpeg;base64," + v.input_thumb;
      box.appendChild(input);
    }
    box.appendChild(el("div", "id", v.id));
    box.appendChild(el("div", "status-" + v.status,
      v.status + (v.attempts > 1 ? " (" + v.attempts + " tries)" : "")));
    box.appendChild(el("div", "", seconds(v.seconds) + " · " +
      (v.gpu_seconds === null ? "–" : v.gpu_seconds.toFixed(1)) + " GPU-s"));
    if (v.error) box.appendChild(el("div", "err", v.error));
    return box;
  }

  function render() {
    const shown = videos.filter(function (v) { return filters[state.filter](v) && matches(v); });
    shown.sort(orders[state.order]);
    const pages = Math.max(1, Math.ceil(shown.length / PAGE_SIZE));
    state.page = Math.min(state.page, pages - 1);
    const first = state.page * PAGE_SIZE;
    const fragment = document.createDocumentFragment();
    shown.slice(first, first + PAGE_SIZE).forEach(function (v) { fragment.appendChild(card(v)); });
    sheet.replaceChildren(fragment);
    document.getElementById("page").textContent = shown.length
      ? "videos " + (first + 1) + "–" + Math.min(first + PAGE_SIZE, shown.length) + " of " + shown.length +
        " (page " + (state.page + 1) + " of " + pages + ")"
      : "no video matches";
    document.getElementById("prev").disabled = state.page === 0;
    document.getElementById("next").disabled = state.page >= pages - 1;
    Object.keys(filters).forEach(function (name) {
      document.getElementById("n-" + name).textContent = videos.filter(filters[name]).length;
    });
  }

  document.querySelectorAll("[data-filter]").forEach(function (button) {
    button.addEventListener("click", function () {
      document.querySelectorAll("[data-filter]").forEach(function (b) { b.classList.remove("on"); });
      button.classList.add("on");
      state.filter = button.dataset.filter;
      state.page = 0;
      render();
    });
  });
  slowInput.addEventListener("input", function () {
    const value = parseFloat(slowInput.value);
    state.slow = isNaN(value) ? null : value;
    state.page = 0;
    render();
  });
  document.getElementById("query").addEventListener("input", function (event) {
    state.query = event.target.value.trim().toLowerCase();
    state.page = 0;
    render();
  });
  document.getElementById("order").addEventListener("change", function (event) {
    state.order = event.target.value;
    state.page = 0;
    render();
  });
  document.getElementById("prev").addEventListener("click", function () { state.page -= 1; render(); });
  document.getElementById("next").addEventListener("click", function () { state.page += 1; render(); });
  render();
  document.body.dataset.rendered = String(sheet.children.length);
})();
