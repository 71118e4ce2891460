from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('testapp', '0002_legacy'),
    ]

    operations = [
        migrations.CreateModel(
            name='Price',
            fields=[
                ('amount', models.DecimalField(decimal_places=2, max_digits=8, primary_key=True, serialize=False)),
                ('label', models.CharField(default='', max_length=50)),
            ],
        ),
        migrations.CreateModel(
            name='Shift',
            fields=[
                ('starts_at', models.DateTimeField(primary_key=True, serialize=False)),
                ('name', models.CharField(default='', max_length=50)),
            ],
        ),
    ]
