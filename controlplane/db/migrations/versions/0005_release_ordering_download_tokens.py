"""OTA releases: release numbers, signed per-deployment releases, hashed per-device download tokens

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25

Existing model versions get release numbers in the order they were registered. The plain-text download
tokens of existing deployments are dropped (not carried over as hashes: they were readable by viewers); a
deployment still running when this migration runs will issue fresh tokens for the commands it has yet to send.
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('model_version') as batch:
        batch.add_column(sa.Column('release', sa.Integer(), nullable=True))
    conn = op.get_bind()
    versions = conn.execute(sa.text('SELECT version FROM model_version ORDER BY created_at, version')).scalars()
    for number, version in enumerate(list(versions), start=1):
        conn.execute(sa.text('UPDATE model_version SET release = :n WHERE version = :v'),
                     {'n': number, 'v': version})
    with op.batch_alter_table('model_version') as batch:
        batch.alter_column('release', existing_type=sa.Integer(), nullable=False)
        batch.create_index(batch.f('ix_model_version_release'), ['release'], unique=True)
    with op.batch_alter_table('deployment') as batch:
        batch.add_column(sa.Column('rollback', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.drop_column('download_token')
    with op.batch_alter_table('deployment_target') as batch:
        batch.add_column(sa.Column('token_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch.create_index(batch.f('ix_deployment_target_token_hash'), ['token_hash'], unique=False)
    op.create_table('deployment_release',
    sa.Column('deployment_id', sa.Integer(), nullable=False),
    sa.Column('variant', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('signed_release', sa.JSON(), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['deployment_id'], ['deployment.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('deployment_id', 'variant')
    )


def downgrade() -> None:
    op.drop_table('deployment_release')
    with op.batch_alter_table('deployment_target') as batch:
        batch.drop_index(batch.f('ix_deployment_target_token_hash'))
        batch.drop_column('token_hash')
    with op.batch_alter_table('deployment') as batch:
        # The old plain-text tokens are gone; downgraded deployments get an unusable placeholder.
        batch.add_column(sa.Column('download_token', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False,
                                   server_default='revoked'))
        batch.drop_column('rollback')
    with op.batch_alter_table('model_version') as batch:
        batch.drop_index(batch.f('ix_model_version_release'))
        batch.drop_column('release')
