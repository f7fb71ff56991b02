"""Blobs released by the parties that hold them (issue 11): an uploader's row counts its uploads not released
(one for a blob stored before), and a reader's row holds the blob when the uploader handed it over."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("filestore", "0002_access_retention"),
    ]

    operations = [
        migrations.AddField(model_name="access", name="uploads", field=models.PositiveIntegerField(default=1)),
        migrations.AddField(model_name="access", name="holds", field=models.BooleanField(default=False)),
    ]
