"""The one session object the glue creates: it owns the patcher, the LoRA library and our registrations.

Lifecycle (A1111 v1.10.1, reference §1.5/§4.3):
- import of scripts/lora_studio.py: ``Session()``, ``register_settings()`` (options_templates; works with --nowebui);
- ``before_ui``: card page + extra network; ``app_started``: register again (the built-in's before_ui runs after
  ours and takes ``lora`` back: last writer wins); every job (AlwaysVisible ``process``): check again;
- ``activate(p, params)`` per batch / hires pass: resolve → load → ``Patcher.apply``; ``[]`` restores;
- ``on_model_loaded``: forget the layer mapping; the patcher itself notices weights rewritten behind its back
  (checkpoint reload into the same modules) and drops those backups instead of restoring them, while a VAE-only
  reload (which fires the same callback) keeps the merge;
- ``on_script_unloaded`` ("Reload UI"): restore the weights — the next session starts from clean ones.

Take-over (setting ``lora_studio_take_over``, default on): we register as ``lora`` (+ alias ``lyco``) and keep the
built-in idle: its ``loaded_networks`` stays empty and its per-layer state is reset, so its patched forwards do
nothing and never restore a stale backup over our weights. Off: we are ``lorastudio`` only and leave the built-in in
charge of ``<lora:…>``; both in one generation is refused (two owners of one weight can't both restore it).
Forge: cards only; Forge's own LoRA stays in charge (reference §11).
"""
from __future__ import annotations

import os
import re
import traceback
import weakref

from . import infotext
from . import webui as default_host
from .discovery import Discovery

OWN_NAME = "lorastudio"
SECTION = ("lora_studio", "LoRA Studio", "sd")


# Settings -> LoRA Studio -> step speed-ups: (fast_path, cuda_graphs) for each choice
SPEED_CHOICES = ("fast + CUDA graphs", "fast", "plain")
SPEED_FLAGS = {"fast + CUDA graphs": (True, None), "fast": (True, False), "plain": (False, False)}


class Session:
    def __init__(self, host=None, discovery: Discovery | None = None):
        self.host = host or default_host
        self.discovery = discovery or Discovery(
            dirs=self.host.lora_dirs,
            cache_path=os.path.join(self.host.data_dir(), "files.json"),
            can_hash=self.host.hashing_allowed,
            list_hidden=lambda: bool(self.host.opt("list_hidden_files", True)),
            preferred_name=lambda: self.host.opt("lora_preferred_name", "Alias from file"),
        )
        self._patcher = None
        self.network = None          # our ExtraNetwork (registered as lorastudio, and as lora on take-over)
        self.page = None
        self.took_over = False
        self.forge = self.host.forge_info()
        self._forge_reported = False
        self._model_ref = None       # weakref to the model whose layer mapping is cached
        self._mapping = None
        self.applied: list = []      # [(entry, LoraRef, LoadedNetwork)] currently merged
        self.last_messages: list[str] = []
        self.last_result = None
        self._console_details: list[str] = []
        self._file_ids: dict[str, tuple] = {}  # tag name -> (path, mtime_ns, size) of the file last applied
        self._bundled: dict[str, tuple] = {}    # embedding name -> (the Embedding we registered, its source)
        self._default_last = None  # sd_lora's (name, weight) while it is added

    # ------------------------------------------------------------------ settings
    def settings_spec(self) -> dict:
        """Options under Settings -> LoRA Studio (read by the WebUI host's fast_path / cuda_graphs / torch_compile)."""
        return {
            "lora_studio_take_over": dict(
                default=True, label="LoRA Studio handles <lora:…> prompt tags (instead of the built-in Lora)",
                onchange=self.on_take_over_changed,
                # (the WebUI shows info as HTML: the brackets are escaped or the tags vanish)
                info="off: the built-in keeps &lt;lora:…&gt;; use &lt;lorastudio:…&gt; for LoRA Studio"),
            "lora_studio_default_multiplier": dict(
                default=0.0, label="LoRA Studio cards: default weight", component=self.host.gradio_component("Slider"),
                component_args={"minimum": 0.0, "maximum": 2.0, "step": 0.05},
                info="0 = the Extra Networks default multiplier; a card's preferred weight wins"),
            "lora_studio_cache_mb": dict(
                default=1024, label="LoRA Studio: delta cache size (MB, in RAM)", component=self.host.gradio_component("Number"),
                component_args={"precision": 0}, onchange=self.on_cache_size_changed,
                info="computed weight deltas kept for quick switching between LoRA sets; 0 = off"),
            "lora_studio_show_all": dict(
                default=False, label="LoRA Studio cards: show LoRAs of every model family",
                info="otherwise cards for another family than the loaded model's are hidden"),
            "lora_studio_output_dir": dict(
                default="", label="LoRA Studio training: default output folder",
                info="empty = the first LoRA folder (models/Lora or --lora-dir), so new LoRAs show up as cards"),
            "lora_studio_train_speed": dict(
                default=SPEED_CHOICES[0], label="LoRA Studio training: step speed-ups",
                component=self.host.gradio_component("Radio"), component_args={"choices": list(SPEED_CHOICES)},
                info="fast: one LoRA buffer, fused AdamW, no waiting on the GPU inside a step; CUDA graphs: each "
                     "bucket's whole step replayed as one graph, checked against the plain step first; plain: the "
                     "unoptimised step (same results, slower). A training config's fast_path / cuda_graphs win"),
            "lora_studio_torch_compile": dict(
                default=False, label="LoRA Studio training: torch.compile the UNet",
                info="faster steps after a compile of a few minutes per image size (seconds once cached): pays on "
                     "long runs; a config's torch_compile wins"),
            "lora_studio_api_roots": dict(
                default="", label="LoRA Studio HTTP API: extra folders requests may read and write",
                info="comma-separated; the LoRA folders and the extension's data folder are always allowed"),
        }

    def register_settings(self):
        self.host.register_settings(SECTION, self.settings_spec())

    def on_cache_size_changed(self):
        if self._patcher is not None:
            mb = self._cache_mb()
            self._patcher.cache.max_bytes = int(mb * 1024 * 1024)
            if mb <= 0:
                self._patcher.cache.clear()

    def on_take_over_changed(self):
        self.ensure_registered()

    def _cache_mb(self) -> float:
        try:
            return max(0.0, float(self.host.opt("lora_studio_cache_mb", 1024)))
        except (TypeError, ValueError):
            return 1024.0

    @property
    def patcher(self):
        if self._patcher is None:
            from ..apply.patcher import Patcher
            self._patcher = Patcher(cache_mb=self._cache_mb())
        return self._patcher

    # ------------------------------------------------------------------ registration
    @property
    def wants_take_over(self) -> bool:
        return not self.forge and bool(self.host.opt("lora_studio_take_over", True))

    @property
    def tag_kind(self) -> str:
        """The tag our cards insert: Forge's own `lora`, ours `lora` on take-over, else `lorastudio`."""
        return "lora" if (self.forge or self.wants_take_over) else OWN_NAME

    def report_forge(self):
        if self.forge and not self._forge_reported:
            self._forge_reported = True
            self.host.console(f"{self.forge} detected: LoRA cards and file tools work; <lora:…> stays with "
                              "Forge's own LoRA (LoRA Studio's merge path and training are off on Forge).")

    def before_ui(self):
        self.report_forge()
        self.ensure_registered()  # first: a failing page must not cost the <lora:…> handling
        self._explain_nans(self.nan_note)
        self.discovery.refresh()
        from ..ui import cards
        self.page = cards.make_page(self)
        self.host.register_page(self.page)
        track = getattr(self.host, "track_card_pages", None)
        if track is not None:
            track()

    def app_started(self, demo=None, app=None):
        self.report_forge()
        self.ensure_registered()
        if app is not None and not self.forge:
            try:
                self.studio.mount_api(app)
            except Exception:  # the WebUI must start even if our routes cannot be added
                self.host.console("could not add the training API routes:\n" + traceback.format_exc())
        if not self.forge:
            try:
                from .webui_studio import install_stop_handlers
                install_stop_handlers(self.studio)
            except Exception:  # (a host where signals cannot be handled: jobs still resume from save_state)
                self.host.console("could not install the stop handlers:\n" + traceback.format_exc())

    @property
    def studio(self):
        """The training side (queue, tab backend, API); created on first use so importing starts no thread."""
        if getattr(self, "_studio", None) is None:
            from .webui_studio import Studio
            self._studio = Studio(self)
        return self._studio

    def ui_tabs(self):
        if self.forge:
            return None  # Forge has no ldm/sgm model to train on (reference §11)
        return self.studio.tab()

    def ensure_registered(self) -> bool:
        """Make the registry say what the settings say. Cheap; called before every job. Returns True if changed."""
        if self.forge:
            return False
        reg, aliases = self.host.registry()
        if self.network is None:
            self.network = self.host.make_extra_network(OWN_NAME, self)
        changed = False
        if reg.get(OWN_NAME) is not self.network:
            self.host.register_extra_network(self.network, OWN_NAME)
            changed = True
        if self.wants_take_over:
            self.network.name = "lora"
            if reg.get("lora") is not self.network:
                self.host.register_extra_network(self.network, "lora")
                changed = True
            if aliases.get("lyco") is not self.network:
                self.host.register_extra_network_alias(self.network, "lyco")
                changed = True
            if not self.took_over:
                self.host.console("handling <lora:…> and <lyco:…> tags; the built-in Lora is kept idle "
                                  "(setting 'lora_studio_take_over' switches back to it).")
            self.took_over = True
            self.release_builtin()
            mute = getattr(self.host, "mute_builtin_paste", None)
            if mute is not None:
                mute(lambda: self.took_over)
        else:
            self.network.name = OWN_NAME
            builtin = self.host.builtin_extra_network()
            for name, table in (("lora", reg), ("lyco", aliases)):
                if table.get(name) is self.network:
                    changed = True
                    if builtin is not None and name == "lora":
                        self.host.register_extra_network(builtin, "lora")
                    elif builtin is not None:
                        self.host.register_extra_network_alias(builtin, "lyco")
                    else:
                        del table[name]
            if self.took_over:
                self.host.console("<lora:…> handed back to the built-in Lora; LoRA Studio answers to <lorastudio:…>.")
            self.took_over = False
        return changed

    def before_job(self, p):
        """AlwaysVisible ``process`` hook: fix the registry, and put weights back when nothing will activate."""
        self.ensure_registered()
        if getattr(p, "disable_extra_networks", False) and self._patcher is not None and self._patcher.is_patched():
            self.restore()

    # ------------------------------------------------------------------ model
    def layer_mapping(self, model):
        if self._model_ref is None or self._model_ref() is not model or self._mapping is None:
            from ..apply.layers import layer_mapping
            self._mapping = layer_mapping(model)
            self._model_ref = weakref.ref(model)
        return self._mapping

    def on_model_loaded(self, sd_model):
        redraw = getattr(self.host, "redraw_card_pages", None)
        if redraw is not None:
            redraw()
        old = self._model_ref() if self._model_ref is not None else None
        self._mapping = None
        self._model_ref = None
        if self._patcher is None or old is None or old is sd_model:
            return  # same model: stale backups (weights reloaded) are detected per parameter by the patcher
        if _on_meta(old):
            self._patcher.forget(old)   # unloaded to 'meta': nothing to restore into; free the CPU backups
        else:
            self._report_result(self._patcher.restore(), None)  # e.g. cached on CPU: leave it clean
        self.applied = []

    def release_builtin(self, model=None) -> int:
        """Put back what the built-in Lora merged, on every layer of the (loaded) model, and empty its list: it keeps
        its last <lora:> merged until a layer's next forward, so a take-over or a training job would otherwise keep
        that merge for good or train on top of it. Its next image loads what its prompt names again."""
        model = model if model is not None else getattr(self.host, "loaded_model", lambda: None)()
        if model is None:
            return self.host.neutralise_builtin((), clear_loaded=True)
        return self.host.neutralise_builtin(list(model.modules()), clear_loaded=True)

    def restore(self):
        if self._patcher is not None:
            self._report_result(self._patcher.restore(), None)
        self.applied = []
        if self._bundled:
            self._sync_bundled([], [])

    def shutdown(self):
        """on_script_unloaded: leave clean weights and the registry to the next session."""
        try:
            if getattr(self, "_studio", None) is not None:
                self._studio.stop()  # a running job saves a state and stays in line, to go on afterwards
            self.restore()
        finally:
            if self.network is not None and not self.forge:
                reg, aliases = self.host.registry()
                builtin = self.host.builtin_extra_network()
                for name in (OWN_NAME, "lora"):
                    self.host.unregister(name, self.network)
                self.host.unregister("lyco", self.network)
                if builtin is not None and "lora" not in reg:
                    self.host.register_extra_network(builtin, "lora")
                    self.host.register_extra_network_alias(builtin, "lyco")
            self._explain_nans(None)

    # ------------------------------------------------------------------ activation
    def tag_name_for(self, entry) -> str:
        from ..ui.cards import tag_name_for
        return tag_name_for(self, entry)

    def _builtin_in_use(self, p) -> bool:
        if self.took_over:
            return False
        reg, aliases = self.host.registry()
        data = dict(getattr(p, "extra_network_data", None) or {})
        if getattr(p, "is_hr_pass", False):
            data.update(getattr(p, "hr_extra_network_data", None) or {})
        for kind in ("lora", "lyco"):
            owner = reg.get(kind) or aliases.get(kind)
            if data.get(kind) and owner is not None and owner is not self.network:
                return True
        return self.host.builtin_extra_network() is not None and self.host.opt("sd_lora", "None") not in ("None", "", None)

    def _colon_hint(self, items) -> str:
        """A file whose name holds ':' splits its own tag; say so when the joined name is a file."""
        items = [str(x) for x in items]
        for n in range(2, len(items) + 1):
            if self.discovery.resolve(":".join(items[:n]).strip(), rescan=False) is not None:
                return (f" (a LoRA file is named '{':'.join(items[:n]).strip()}': ':' ends the name in a tag, so "
                        "rename the file)")
        return ""

    def _default_lora(self, p, refs):
        """The built-in's "Add network to prompt" setting (sd_lora): honoured when we own <lora:…>. The tag goes
        into the prompts once per job: activate runs again for the hires pass, each batch, and once more for each
        name we are registered under."""
        additional = self.host.opt("sd_lora", "None")
        mult = self.host.opt("extra_networks_default_multiplier", 1.0)
        now = None if not self.took_over or additional in ("None", "", None) else (additional, mult)
        if now != self._default_last:
            # A1111 keys its cached conditioning by the prompt's own tags, and the added LoRA is not among them
            self._default_last = now
            self._forget_conds(p)
        if now is None:
            return refs
        if any(r.name == additional for r in refs) or not isinstance(getattr(p, "all_prompts", None), list):
            return refs
        from ..apply.parser import parse_params
        if not getattr(p, "lora_studio_default_added", False):
            tag = f"<lora:{additional}:{mult}>"
            p.all_prompts = [x + tag for x in p.all_prompts]
            # the hires prompts too: else the infotext's "Hires prompt" lacks the tag and does not reproduce
            if getattr(p, "enable_hr", False) and isinstance(getattr(p, "all_hr_prompts", None), list):
                p.all_hr_prompts = [x + tag for x in p.all_hr_prompts]
            p.lora_studio_default_added = True
        return refs + [parse_params([additional, mult])]

    def activate(self, p, params_list):
        from ..apply.parser import LoraTagError, parse_params
        msgs: list[str] = []
        refs = []
        for params in params_list:
            try:
                ref = parse_params(params.items)
            except LoraTagError as e:
                msgs.append(str(e) + self._colon_hint(params.items))
                continue
            refs.append(ref)
            msgs.extend(ref.notes())
        msgs.extend(_miscased_tags(p))
        msgs.extend(_negative_tags(p))
        refs = self._default_lora(p, refs)
        msgs.extend(_repeated_tags(refs))

        if refs and self._builtin_in_use(p):
            msgs.append("LoRA Studio tags were ignored: the built-in Lora handles <lora:…> in this generation and "
                        "both can't patch the same weights; turn on 'lora_studio_take_over' to use one for all.")
            refs = []
        if not refs:
            self.restore()
            if hasattr(p, "extra_generation_params"):
                infotext.record_hashes(p, [], self._hashes_key())
            self._report(p, msgs)
            return

        model = self.host.current_model()
        from ..apply.layers import model_family
        family = model_family(model)
        mapping = self.layer_mapping(model)
        wanted, used = [], []
        for ref in refs:
            net = self._load(ref, family, msgs, mapping)
            if net is not None:
                wanted.append((net[1], ref.te, ref.unet, ref.dyn))
                used.append((net[0], ref, net[1]))

        # The built-in first: what it merged goes back from its own backup before we take ours.
        self.host.neutralise_builtin(mapping.values(), clear_loaded=self.took_over)
        try:
            with self.host.without_autocast():
                result = self.patcher.apply(mapping, wanted)
        except Exception as e:  # a bug or OOM mid-merge: never leave half-merged weights
            traceback.print_exc()
            msgs.append(f"applying LoRA(s) failed ({type(e).__name__}: {e}); the model was restored")
            self.restore()
            self._report(p, msgs)
            return
        self.applied = used
        self._sync_bundled(used, msgs)
        self._forget_conds_if_files_changed(p, refs, used)
        self._report_result(result, used, msgs)
        # only what changed the image: a file that applied nothing is no ingredient to reproduce it with
        names_hashes = [(ref.name, self.discovery.read_hash(entry))
                        for (entry, ref, net), stats in zip(used, result.networks)
                        if stats.applied or getattr(net, "bundle_embeddings", None)]
        msgs.extend(_one_file_under_two_names(used))
        if self.host.opt("lora_add_hashes_to_infotext", True):
            infotext.record_hashes(p, names_hashes, self._hashes_key())
        self._report(p, msgs)

    def _sync_bundled(self, used, msgs):
        """Textual-inversion embeddings saved inside the LoRAs in use are known to the prompt while their LoRA is
        (the built-in Lora does the same); the conditioning is computed after this, so this job sees them. One
        still registered from the same file for the same model is kept as it is, not rebuilt per generation."""
        get_db = getattr(self.host, "embedding_db", None)
        db = get_db() if get_db is not None else None
        wanted = [(entry, ref, net, name, data) for entry, ref, net in used
                  for name, data in (getattr(net, "bundle_embeddings", None) or {}).items()]
        if db is None:
            if wanted:
                msgs.append(f"LoRA '{wanted[0][1].name}': its bundled embedding '{wanted[0][3]}' is not used "
                            "(no embedding database here)")
            return
        model = self.host.current_model()
        words = getattr(db, "word_embeddings", {})

        def ident(entry, net):  # (None: a file read without a content key is built again)
            key = getattr(net, "key", None)
            return None if key is None else (entry.filename, key, id(model))

        first = {}
        for entry, _ref, net, name, _data in wanted:
            first.setdefault(name, ident(entry, net))
        kept = {}
        for name, (emb, was) in list(self._bundled.items()):
            if words.get(name) is not emb:  # (one the embeddings folder has loaded since under that name stays)
                continue
            if was is not None and first.get(name) == was:
                kept[name] = (emb, was)
            else:
                db.register_embedding_by_name(None, model, name)
        self._bundled = dict(kept)
        for entry, ref, net, name, data in wanted:
            if kept.pop(name, None) is not None and ident(entry, net) == first[name]:
                continue  # (registered from this file already)
            if name in words:
                msgs.append(f"LoRA '{ref.name}': its bundled embedding '{name}' is not used: an embedding of that "
                            "name is already loaded (from the embeddings folder or another LoRA)")
                continue
            try:
                emb = self.host.make_embedding(data, name, entry.filename, ref.name)
            except Exception as e:  # a malformed bundle must not cost the LoRA itself
                msgs.append(f"LoRA '{ref.name}': its bundled embedding '{name}' could not be read ({e})")
                continue
            expected = getattr(db, "expected_shape", -1)
            if expected not in (-1, None) and getattr(emb, "shape", expected) != expected:
                msgs.append(f"LoRA '{ref.name}': its bundled embedding '{name}' is for another model (width "
                            f"{emb.shape}, this model's text encoder takes {expected}); not used")
                continue
            db.register_embedding(emb, model)
            self._bundled[name] = (emb, ident(entry, net))

    def _forget_conds_if_files_changed(self, p, refs, used):
        """A file rewritten under a name (a retrained LoRA, a new download), added after a 'not found' or gone
        since, must not meet the conditioning A1111 cached for the same prompt with the old text-encoder part."""
        loaded = {ref.name: getattr(net, "key", None) for entry, ref, net in used}
        changed = False
        for ref in refs:
            ident = loaded.get(ref.name)  # (None: not found or not readable this time)
            if ref.name in self._file_ids and self._file_ids[ref.name] != ident:
                changed = True
            self._file_ids[ref.name] = ident
        if changed:
            self._forget_conds(p)

    def _forget_conds(self, p):
        forget = getattr(self.host, "forget_conds", None)  # (hosts without A1111's cond cache have none)
        if forget is not None:
            forget(p)

    def _hashes_key(self) -> str:
        return infotext.HASHES_KEY if self.took_over else infotext.OWN_HASHES_KEY

    def _load(self, ref, family, msgs, mapping):
        from ..apply.loader import load_network
        from ..formats.errors import LoraError, LoraFileError
        entry = self.discovery.resolve(ref.name)
        if entry is None:
            msgs.append(self._not_found(ref.name, family))
            return None
        self._say_if_ambiguous(ref.name, entry, msgs)
        try:
            return entry, load_network(entry.filename, family, layer_names=mapping)
        except LoraError as e:
            pickle = os.path.splitext(entry.filename)[1].lower() in (".pt", ".ckpt")
            if isinstance(e, LoraFileError) and entry.is_safetensors and not (entry.error or entry.not_lora):
                self.discovery.note_damaged(entry, str(e))
            hint = (" (The built-in Lora does open them: switch off 'LoRA Studio handles <lora:…> prompt tags' in "
                    "Settings → LoRA Studio to let it.)" if pickle and self.took_over else "")
            msgs.append(f"LoRA '{ref.name}' not applied: {e}{hint}")
            if getattr(e, "detail", None):
                self._console_details.append(f"LoRA '{ref.name}': {e.detail}")
        except Exception as e:  # unexpected: full traceback to the console, one line to the user
            traceback.print_exc()
            msgs.append(f"LoRA '{ref.name}' not applied: {type(e).__name__} while loading "
                        f"{os.path.basename(entry.filename)}: {e}")
        return None

    def _not_found(self, name: str, family: str | None = None) -> str:
        disc = self.discovery
        owners = disc.alias_owners(name) if disc.is_forbidden_alias(name) else []
        if len(owners) > 1:
            files = ", ".join(sorted(e.relname for e in owners))
            return (f"LoRA '{name}' is the name (ss_output_name) of several files ({files}): write the file's own "
                    "name instead, e.g. from its card")
        # the folders go to the console only: the message is also written into every image's infotext
        dirs = ", ".join(disc.dirs()) or "(no LoRA folder configured)"
        self._console_details.append(f"LoRA '{name}' was looked for in {dirs}")
        near = disc.near_names(name, family=family)
        hint = f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
        return (f"LoRA not found: '{name}' (a file name, alias or sub/folder/name from the LoRA folders works; "
                f"Refresh the Lora tab after adding files){hint}")

    def _say_if_ambiguous(self, name: str, entry, msgs):
        """A bare name that several files share (in different subfolders): the choice is A1111's, said here."""
        if name != entry.name:  # a sub/folder/name or an alias reaches one file
            return
        same = [e for e in self.discovery.same_name(entry) if e is not entry]
        if same:
            others = ", ".join(sorted(e.relname for e in same))
            tags = " or ".join(f"<lora:{self.tag_name_for(e)}:…>" for e in same[:2])
            msgs.append(f"LoRA '{name}' names {len(same) + 1} files; used {entry.relname} (not {others}): write "
                        f"{tags} for {'another' if len(same) > 1 else 'the other'}")

    def _report_result(self, result, used, msgs=None):
        """What could not be applied becomes one message per LoRA that says why; nothing is dropped silently."""
        self.last_result = result
        out = msgs if msgs is not None else []
        details = []
        for (entry, ref, net), stats in zip(used or [], result.networks):
            report = getattr(net, "report", None)
            unmatched = dict(getattr(report, "unmatched", None) or {})
            unreadable = {k: r for k, r in unmatched.items() if str(r).startswith("could not be read")}
            nolayer = [k for k in unmatched if k not in unreadable]
            why = []
            if nolayer:
                why.append(f"{len(nolayer)} of its modules match no layer of this model (e.g. "
                           f"{', '.join(nolayer[:3])})")
            if unreadable:
                k = next(iter(unreadable))
                reason = unreadable[k][len("could not be read: "):].replace(f"module '{k}': ", "")
                why.append(f"{len(unreadable)} module(s) are damaged or incomplete (e.g. {k}: {reason})")
            if stats.unmatched:
                why.append(f"{len(stats.unmatched)} layer(s) could not be patched (e.g. {stats.unmatched[0]})")
            if stats.errors:
                why.append(f"{len(stats.errors)} layer(s) failed (e.g. {stats.errors[0]})")
            if stats.skipped:
                why.append(f"{len(stats.skipped)} layer(s) skipped (e.g. {stats.skipped[0]})")
            if why or (stats.applied == 0 and not getattr(net, "bundle_embeddings", None)):
                total = getattr(report, "total_modules", 0) or stats.matched + len(stats.unmatched)
                head = (f"LoRA '{ref.name}' not applied" if stats.applied == 0 else
                        f"LoRA '{ref.name}' partly applied ({stats.applied} of its {total} modules)")
                if report is not None and getattr(report, "family_mismatch", None):
                    why.insert(0, report.family_mismatch)
                out.append(head + ": " + ("; ".join(why) or "it changes no layer of this model"))
                if report is not None:
                    details.append(report.details())
                details.extend(f"LoRA '{ref.name}': {m}" for m in stats.unmatched + stats.errors + stats.skipped)
            notes = list(getattr(net, "warnings", None) or [])
            notes += [n for n in (getattr(report, "notes", None) or []) if n != getattr(report, "family_mismatch", 0)]
            notes = [n for n in notes if "could not be read" not in n]
            if notes:
                more = f" (and {len(notes) - 1} more, in the console)" if len(notes) > 1 else ""
                out.append(f"LoRA '{ref.name}': {notes[0]}{more}")
                details.extend(f"LoRA '{ref.name}': {n}" for n in notes[1:])
        # Which layers, stale backups after a checkpoint reload: the console only; the per-LoRA line above is
        # what the UI and the infotext show.
        self._console_details += details + list(getattr(result, "messages", []) or [])
        if not used:
            self._flush_details(set())
        return out

    def _flush_details(self, seen: set):
        for m in self._console_details:
            if ("console", m) not in seen:
                seen.add(("console", m))
                self.host.console(m)
        self._console_details = []

    def _report(self, p, msgs):
        self.last_messages = list(msgs)
        seen = getattr(p, "lora_studio_reported", None)
        if not isinstance(seen, set):
            seen = set()
            try:
                p.lora_studio_reported = seen
            except AttributeError:
                pass  # a bare object: report every time rather than never
        self._flush_details(seen)
        if not msgs:
            return
        new = [m for m in msgs if m not in seen]
        said = getattr(p, "lora_studio_said", None)
        if not isinstance(said, list):
            said = []
            try:
                p.lora_studio_said = said
            except AttributeError:
                pass
        for m in new:
            seen.add(m)
            said.append(m)  # in prompt order, so each line sits where its tag is
            self.host.console(m)
            if hasattr(p, "comment"):
                p.comment(m)
        shown = said
        if hasattr(p, "extra_generation_params") and shown:
            p.extra_generation_params[infotext.WARNINGS_KEY] = " | ".join(shown)

    def deactivate(self, p):
        # Weights stay merged until the wanted set changes (as the built-in); problems were reported on activate.
        pass

    def _explain_nans(self, note):
        explain = getattr(self.host, "explain_nans", None)  # (headless hosts have no A1111 NaN check)
        if explain is not None and not self.forge:
            explain(note)

    def nan_note(self) -> str:
        """Added to A1111's NaN error while LoRAs are applied: the tags to suspect, a far-out weight first."""
        from ..apply.parser import LARGE_WEIGHT
        if not self.applied:
            return ""
        refs = [ref for _, ref, _ in self.applied]
        tag = (lambda r: r.tag or f"<lora:{r.name}:{r.unet:g}>")
        big = [r for r in refs if max(abs(r.te), abs(r.unet)) > LARGE_WEIGHT]
        if big:
            return (f"LoRA Studio: {', '.join(tag(r) for r in big)} has a weight far outside the usual -2 to 2, the "
                    "likely cause: lower it and generate again (--disable-nan-check would only hide a black image).")
        absurd = [ref for _, ref, net in self.applied if getattr(net, "huge_values", None)]
        if absurd:
            return (f"LoRA Studio: {', '.join(tag(r) for r in absurd)}: its file holds values far beyond a LoRA's "
                    "(saved from a training run that diverged), the likely cause: use an earlier epoch's file.")
        which = "it, it" if len(refs) == 1 else "them, one of them"
        return (f"LoRA Studio: this image applied {', '.join(tag(r) for r in refs)}; if the prompt works without "
                f"{which} is the cause (a weight too high, or an overtrained or damaged file: try an earlier epoch).")

    # ------------------------------------------------------------------ infotext
    def infotext_pasted(self, infotext_text, params):
        infotext.infotext_pasted(self, infotext_text, params)

    def status(self) -> dict:
        return {
            "forge": self.forge,
            "took_over": self.took_over,
            "tag": self.tag_kind,
            "applied": [(ref.name, ref.te, ref.unet, ref.dyn) for _, ref, _ in self.applied],
            "lora_dirs": self.discovery.dirs(),
            "files": len(self.discovery.by_path),
        }


def _repeated_tags(refs) -> list[str]:
    names = [r.name for r in refs]
    return [f"LoRA '{name}' is in the prompt {names.count(name)} times: their weights add up "
            f"({' + '.join(f'{r.unet:g}' for r in refs if r.name == name)} for the UNet)"
            for name in dict.fromkeys(n for n in names if names.count(n) > 1)]


def _one_file_under_two_names(used) -> list[str]:
    by_file: dict[str, list[str]] = {}
    for entry, ref, _ in used:
        by_file.setdefault(entry.filename, []).append(ref.name)
    return [f"LoRA {' and '.join(repr(n) for n in dict.fromkeys(names))} are one file: their weights add up"
            for names in by_file.values() if len(set(names)) > 1]


_KIND_RE = re.compile(r"<(\w+):")


def _miscased_tags(p) -> list[str]:
    """A1111 matches tag kinds case-sensitively: <LORA:…> is taken out of the prompt and applies nothing."""
    texts = set(getattr(p, "all_prompts", None) or []) | set(getattr(p, "all_hr_prompts", None) or [])
    wrong = {k for t in texts if isinstance(t, str) for k in _KIND_RE.findall(t)
             if k.lower() in ("lora", "lyco", "lorastudio") and k != k.lower()}
    return [f"<{k}:…> is not read (tag kinds are lower case): write <{k.lower()}:…>" for k in sorted(wrong)]


_NEGATIVE_TAG_RE = re.compile(r"<(?:lora|lyco|lorastudio):[^>]*>", re.IGNORECASE)


def _negative_tags(p) -> list[str]:
    """A1111 takes extra-network tags out of the prompt only: in the negative prompt they stay words for the text
    encoder and apply nothing, which looks like the LoRA was used."""
    texts = (list(getattr(p, "all_negative_prompts", None) or [getattr(p, "negative_prompt", None) or ""])
             + list(getattr(p, "all_hr_negative_prompts", None) or []))
    tags = sorted({m.group(0) for t in texts if isinstance(t, str) for m in _NEGATIVE_TAG_RE.finditer(t)})
    if not tags:
        return []
    shown = ", ".join(tags[:3]) + (f" and {len(tags) - 3} more" if len(tags) > 3 else "")
    return [f"{shown} in the negative prompt: not applied (LoRA tags work in the prompt only) and read as words by "
            "the text encoder; remove from the negative prompt"]


def _on_meta(model) -> bool:
    try:
        for p in model.parameters():
            return p.is_meta
    except Exception:  # not an nn.Module
        return False
    return False
