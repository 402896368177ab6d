// LoRA Studio: only what gradio 3.41 cannot do itself.
// - start A1111's progress bar for a queued training job (the textual-inversion pattern);
// - put the chosen <lora:name:weight> into txt2img's prompt;
// - press the tab's Refresh button on a timer while the Train tab is visible.
// Everything degrades when the WebUI's helpers (gradioApp, requestProgress, updateInput) are absent.

function lsApp() {
    if (typeof gradioApp === "function") return gradioApp();
    var el = document.getElementsByTagName("gradio-app");
    var app = el.length ? el[0] : document;
    return app.shadowRoot ? app.shadowRoot : app;
}

function lsRandomId() {
    if (typeof randomId === "function") return randomId();
    return "task(" + Math.random().toString(36).slice(2, 9) + Math.random().toString(36).slice(2, 9) + ")";
}

function lsEscape(s) {
    return String(s).replace(/[&<>"']/g, function(c) {
        return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c];
    });
}

// _js of Train / Add to queue / Resume: arguments[0] is the hidden task-id box; the job reports to that id.
function lora_studio_start_training() {
    var args = Array.prototype.slice.call(arguments);
    var id = lsRandomId();
    args[0] = id;
    if (typeof requestProgress === "function") {
        var app = lsApp();
        var anchor = app.querySelector("#lora_studio_progressbar");
        if (anchor) {
            try {
                requestProgress(id, anchor, null, lsRefreshCards, function() {});
            } catch (e) {
                console.warn("LoRA Studio: the WebUI progress bar could not start:", e);
            }
        }
    }
    lsPollSoon();
    return args;
}

// _js after "Use this one": "tag" or "tag\nwords" (from Python) -> txt2img prompt; returns the status HTML to show.
function lora_studio_use_tag(tag, status) {
    status = status || "";
    if (!tag) return status;
    var parts = tag.split("\n");
    tag = parts[0];
    var words = (parts[1] || "").trim();
    var app = lsApp();
    var ta = app.querySelector("#txt2img_prompt textarea");
    if (!ta) {
        return status + '<div class="ls-msg ls-info" role="status">The txt2img prompt is not on this page; ' +
            "copy the tag yourself: <code>" + lsEscape(tag + (words ? " " + words : "")) + "</code></div>";
    }
    var name = tag.replace(/^<lora:([^:>]+).*$/, "$1");
    var same = new RegExp("<lora:" + name.replace(/[.*+?^${}()|[\]\\]/g, "\\$&") + "(:[^>]*)?>");
    var added = tag;
    if (same.test(ta.value)) {
        ta.value = ta.value.replace(same, tag);  // the same LoRA again: change its weight, don't add it twice
    } else {
        // the trigger words too (the card's activation text), unless the prompt has them already
        if (words && ta.value.toLowerCase().indexOf(words.toLowerCase()) < 0) added = tag + " " + words;
        var sep = (typeof opts === "object" && opts && opts.extra_networks_add_text_separator) || " ";
        ta.value = ta.value && !/\s$/.test(ta.value) ? ta.value + sep + added : ta.value + added;
    }
    if (typeof updateInput === "function") {
        updateInput(ta);
    } else {
        ta.dispatchEvent(new Event("input", {bubbles: true}));
    }
    return status + '<div class="ls-msg ls-ok" role="status">Added <code>' + lsEscape(added) +
        "</code> to the txt2img prompt.</div>";
}

// A finished job's LoRA files show on the txt2img / img2img card pages without pressing their Refresh: the
// WebUI builds those pages once and keeps them (a browser reload shows the old list), and each page's hidden
// refresh button rebuilds them all.
function lsRefreshCards() {
    var app = lsApp();
    if (!app || !app.querySelector) return;
    ["txt2img", "img2img"].forEach(function(tab) {
        var btn = app.querySelector('[id^="' + tab + '_"][id$="_extra_refresh_internal"]');
        if (btn) btn.dispatchEvent(new Event("click"));
    });
}

// Auto refresh: every 1.5 s while a job waits or trains, every 10 s otherwise; only while the Train tab shows.
var lsLastPoll = 0;
var lsWasActive = false;

function lsPollSoon() {
    lsLastPoll = 0;
}

function lsTick() {
    var app = lsApp();
    if (!app || !app.querySelector) return;
    var btn = app.querySelector("#lora_studio_refresh");
    var panel = app.querySelector("#lora_studio_jobs");
    if (!btn || !panel || panel.offsetParent === null || document.visibilityState === "hidden") return;
    var auto = app.querySelector("#lora_studio_auto input[type=checkbox]");
    if (auto && !auto.checked) return;
    var jobs = panel.querySelector(".ls-jobs");
    var active = jobs && jobs.getAttribute("data-active") === "1";
    if (lsWasActive && !active) lsRefreshCards();  // (the queue ran out: its last job wrote its files)
    lsWasActive = !!active;
    var now = Date.now();
    if (now - lsLastPoll < (active ? 1500 : 10000)) return;
    lsLastPoll = now;
    btn.click();
}

setInterval(lsTick, 500);
