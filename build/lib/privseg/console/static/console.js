// privseg console: the only script. Progressive: every page works without it except the upload
// progress bar and the editor's live check. Same-origin requests only; the CSRF token is read from
// the page's own forms.
"use strict";

function csrfOf(form) {
  const field = form.querySelector('input[name="csrf"]');
  return field ? field.value : form.dataset.csrf || "";
}

function liveCheck(form) {
  const text = form.querySelector("textarea[name=text]");
  const out = document.getElementById("check");
  let timer = null;
  async function check() {
    if (!text.value.trim()) { out.textContent = ""; return; }
    const body = new URLSearchParams({ text: text.value, csrf: csrfOf(form) });
    try {
      const response = await fetch(form.dataset.validate, { method: "POST", body, credentials: "same-origin" });
      const answer = await response.json();
      if (answer.ok) {
        out.className = "check ok";
        out.textContent = "Valid: " + answer.results.map((r) => `${r.kind} ${r.id} would be ${r.status} (v${r.version})`).join("; ");
      } else {
        out.className = "check error";
        out.textContent = answer.error || "not valid";
      }
    } catch (err) {
      out.className = "check error";
      out.textContent = "could not check the definition (is the server up?)";
    }
  }
  text.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(check, 400); });
  check();
}

function upload(form) {
  const bar = document.getElementById("progress");
  const out = document.getElementById("upload-result");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const file = form.querySelector("input[type=file]").files[0];
    if (!file) return;
    const kind = form.querySelector("#kind").value;
    const mode = form.querySelector("#mode").value;
    const query = new URLSearchParams({ filename: file.name, mode: kind === "profiles" ? mode : "patch" });
    const xhr = new XMLHttpRequest();
    xhr.open("POST", form.dataset.action + encodeURIComponent(kind) + "?" + query);
    xhr.setRequestHeader("X-CSRF-Token", csrfOf(form));
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) bar.value = Math.round((100 * e.loaded) / e.total); };
    xhr.onload = () => {
      let answer = {};
      try { answer = JSON.parse(xhr.responseText); } catch (err) { answer = { ok: false, error: "unexpected answer" }; }
      if (answer.ok) {
        bar.value = 100;
        out.className = "ok";
        out.textContent = answer.results.map((r) => `${r.source}: ${r.stored ? "stored" : "already stored"}, ${r.rows} rows`).join("; ");
      } else {
        out.className = "error";
        out.textContent = "Refused: " + (answer.error || "the upload failed");
      }
    };
    xhr.onerror = () => { out.className = "error"; out.textContent = "The upload failed (connection)."; };
    out.textContent = "Uploading…";
    xhr.send(file);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const editor = document.getElementById("editor");
  if (editor) liveCheck(editor);
  const uploader = document.getElementById("upload");
  if (uploader) upload(uploader);
});
