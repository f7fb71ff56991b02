"""Blobs released by the parties that hold them (issue 11): an uploader's release is recorded on its row, and a
reader's row holds the blob when the uploader handed it over."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("filestore", "0002_access_retention"),
    ]

    operations = [
        migrations.AddField(model_name="access", name="released", field=models.BooleanField(default=False)),
        migrations.AddField(model_name="access", name="holds", field=models.BooleanField(default=False)),
    ]
