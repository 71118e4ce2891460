import tests.testapp.models
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('testapp', '0001_initial'),
    ]

    operations = [
        migrations.CreateModel(
            name='Legacy',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('doc', tests.testapp.models.PlainJSONField(default='{}')),
                ('title', models.CharField(default='', max_length=50)),
            ],
        ),
    ]
