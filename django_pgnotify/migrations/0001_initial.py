import django.db.models.functions.datetime
from django.db import migrations, models


class Migration(migrations.Migration):

    initial = True

    dependencies = [
    ]

    operations = [
        migrations.CreateModel(
            name='DurableEvent',
            fields=[
                ('id', models.BigAutoField(primary_key=True, serialize=False)),
                ('declaration', models.TextField()),
                ('model', models.TextField()),
                ('action', models.TextField()),
                ('xid', models.BigIntegerField(blank=True, null=True)),
                ('changed_at', models.DateTimeField(blank=True, null=True)),
                ('context', models.TextField(blank=True, db_default='', default='')),
                ('payload', models.JSONField()),
                ('pid', models.IntegerField(blank=True, help_text='Backend PID of the writer.', null=True)),
                ('status', models.TextField(choices=[('pending', 'pending'), ('done', 'done'), ('dead', 'dead letter')], db_default='pending', default='pending')),
                ('attempts', models.IntegerField(db_default=0, default=0)),
                ('available_at', models.DateTimeField(db_default=django.db.models.functions.datetime.Now(), help_text='Not claimed before this.')),
                ('lease_owner', models.TextField(blank=True, db_default='', default='')),
                ('lease_until', models.DateTimeField(blank=True, null=True)),
                ('last_error', models.TextField(blank=True, db_default='', default='')),
                ('created_at', models.DateTimeField(db_default=django.db.models.functions.datetime.Now())),
                ('done_at', models.DateTimeField(blank=True, null=True)),
            ],
            options={
                'verbose_name': 'durable event',
                'db_table': 'pgnotify_event',
                'ordering': ['id'],
                'indexes': [models.Index(condition=models.Q(('status', 'pending')), fields=['id'], name='pgnotify_event_pending')],
            },
        ),
    ]
