import django.contrib.postgres.fields
import tests.testapp.models
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('testapp', '0004_measurement'),
    ]

    operations = [
        migrations.CreateModel(
            name='Logbook',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('moments', django.contrib.postgres.fields.ArrayField(base_field=models.DateTimeField(null=True), default=list)),
                ('shifts', django.contrib.postgres.fields.ArrayField(base_field=django.contrib.postgres.fields.ArrayField(base_field=models.DateTimeField(null=True)), null=True)),
                ('days', django.contrib.postgres.fields.ArrayField(base_field=models.DateField(null=True), default=list)),
                ('times', django.contrib.postgres.fields.ArrayField(base_field=models.TimeField(null=True), default=list)),
                ('spans', django.contrib.postgres.fields.ArrayField(base_field=django.contrib.postgres.fields.ArrayField(base_field=models.DurationField(null=True)), null=True)),
                ('tokens', django.contrib.postgres.fields.ArrayField(base_field=models.UUIDField(null=True), default=list)),
                ('blobs', django.contrib.postgres.fields.ArrayField(base_field=models.BinaryField(null=True), default=list)),
                ('ratios', django.contrib.postgres.fields.ArrayField(base_field=models.FloatField(null=True), default=list)),
                ('names', django.contrib.postgres.fields.ArrayField(base_field=models.CharField(max_length=20, null=True), default=list)),
                ('secret', tests.testapp.models.SealedTextField(null=True)),
                ('secrets', django.contrib.postgres.fields.ArrayField(base_field=tests.testapp.models.SealedTextField(null=True), default=list)),
                ('tags', tests.testapp.models.CommaSeparatedField(null=True)),
                ('seen_at', tests.testapp.models.WallClockDateTimeField(null=True)),
            ],
        ),
    ]
