"""Read access per party and the last use of each blob (issue 7 §5). Blobs stored before this
migration stay readable by the party that uploaded them."""

import django.db.models.deletion
import django.utils.timezone
from django.db import migrations, models


def uploaders_may_read(apps, schema_editor):
    Blob = apps.get_model("filestore", "Blob")
    Access = apps.get_model("filestore", "Access")
    rows = Blob.objects.values_list("sha256", "uploaded_by")
    Access.objects.bulk_create([Access(blob_id=sha, party=party, uploader=True) for sha, party in rows], batch_size=500)


class Migration(migrations.Migration):

    dependencies = [
        ("filestore", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="blob",
            name="last_used_at",
            field=models.DateTimeField(db_index=True, default=django.utils.timezone.now),
        ),
        migrations.CreateModel(
            name="Access",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("party", models.CharField(max_length=64)),
                ("uploader", models.BooleanField(default=False)),
                (
                    "blob",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE, related_name="access", to="filestore.blob"
                    ),
                ),
            ],
            options={
                "indexes": [models.Index(fields=["party", "uploader"], name="access_by_party")],
                "constraints": [models.UniqueConstraint(fields=("blob", "party"), name="one_access_per_party")],
            },
        ),
        migrations.RunPython(uploaders_may_read, migrations.RunPython.noop),
    ]
