"""Test fake of the built-in Lora's ``ui_edit_user_metadata.py`` (A1111 v1.10.1): the Lora card editor class,
here with nothing beyond the base editor."""
from modules import ui_extra_networks_user_metadata


class LoraUserMetadataEditor(ui_extra_networks_user_metadata.UserMetadataEditor):
    pass
