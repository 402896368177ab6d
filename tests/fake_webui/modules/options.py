"""Test fake of A1111 v1.10.1 ``modules/options.py``, written from the documented behaviour (reference §3):

- ``OptionInfo(default, label, …)`` with the documented constructor signature, and the chainable ``.info()``;
- ``options_section((id, label[, category_id]), {key: OptionInfo})`` stamps ``section = (id, label)`` (and
  ``category_id``) on every option and returns the same dict;
- ``Options``: ``opts.key`` reads the stored value, else the option's default; ``set()`` runs ``onchange`` and
  says whether the value changed; ``add_option()`` registers late; ``reorder()`` replaces ``data_labels`` with a
  new (sorted) dict, so afterwards it is no longer the ``options_templates`` dict.
"""


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before='', comment_after='', infotext=None, restrict_api=False,
                 category_id=None):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.onchange = onchange
        self.section = section
        self.refresh = refresh
        self.comment_before = comment_before
        self.comment_after = comment_after
        self.infotext = infotext
        self.restrict_api = restrict_api
        self.category_id = category_id

    def info(self, info):
        """Chainable: adds a note after the label in Settings."""
        self.comment_after += f" ({info})"
        return self


def options_section(section_identifier, options_dict):
    section = tuple(section_identifier[:2])
    category = section_identifier[2] if len(section_identifier) > 2 else None
    for info in options_dict.values():
        info.section = section
        if category is not None:
            info.category_id = category
    return options_dict


class Options:
    def __init__(self, data_labels: dict, restricted_opts):
        self.data_labels = data_labels
        self.data = {key: info.default for key, info in data_labels.items()}
        self.restricted_opts = restricted_opts

    def __getattr__(self, key):  # only called for names that are not ordinary attributes
        if key in ("data", "data_labels"):
            raise AttributeError(key)
        if key in self.data:
            return self.data[key]
        if key in self.data_labels:
            return self.data_labels[key].default
        raise AttributeError(key)

    def set(self, key, value, is_api=False, run_callbacks=True):
        info = self.data_labels[key]
        missing = key not in self.data
        old = self.data.get(key, info.default)
        if old == value or (is_api and info.restrict_api):
            return False
        self.data[key] = value
        if run_callbacks and info.onchange is not None:
            try:
                info.onchange()
            except Exception as e:
                from modules import errors
                errors.display(e, f"changing setting {key} to {value}")
                if missing:
                    del self.data[key]
                else:
                    self.data[key] = old
                return False
        return True

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def reorder(self):
        self.data_labels = dict(sorted(self.data_labels.items(), key=lambda item: str(item[1].section)))
