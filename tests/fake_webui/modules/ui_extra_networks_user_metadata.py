"""Test fake of A1111 v1.10.1 ``modules/ui_extra_networks_user_metadata.py``: only the editor's constructor
(reference §5); the gradio popup is not built in tests."""


class UserMetadataEditor:
    def __init__(self, ui, tabname, page):
        self.ui = ui
        self.tabname = tabname
        self.page = page
