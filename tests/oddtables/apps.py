from django.apps import AppConfig


class OddTablesConfig(AppConfig):
    name = "tests.oddtables"
    label = "oddtables"
    default_auto_field = "django.db.models.BigAutoField"
