"""Blobs named by BLAKE3 as well as sha256 (issue 11): the primary key is the blob's key (`common.hashing.blob_key`),
a sha256's 64 hex characters as before or `blake3-` and 64; rows stored before keep their names."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("filestore", "0003_access_released"),
    ]

    operations = [
        migrations.RenameField(model_name="blob", old_name="sha256", new_name="key"),
        migrations.AlterField(model_name="blob", name="key", field=models.CharField(max_length=71, primary_key=True)),
    ]
