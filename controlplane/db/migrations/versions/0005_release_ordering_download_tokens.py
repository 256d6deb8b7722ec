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
    # Plain column operations only: on SQLite a batch "move and copy" of model_version or deployment would drop a
    # table other rows reference, which the enforced foreign keys refuse. (So `release` stays NULL-able in SQL;
    # the registry always assigns one. DROP COLUMN needs SQLite >= 3.35.)
    op.add_column('model_version', sa.Column('release', sa.Integer(), nullable=True))
    conn = op.get_bind()
    versions = conn.execute(sa.text('SELECT version FROM model_version ORDER BY created_at, version')).scalars()
    for number, version in enumerate(list(versions), start=1):
        conn.execute(sa.text('UPDATE model_version SET release = :n WHERE version = :v'),
                     {'n': number, 'v': version})
    op.create_index(op.f('ix_model_version_release'), 'model_version', ['release'], unique=True)
    op.add_column('deployment', sa.Column('rollback', sa.Boolean(), nullable=False, server_default=sa.false()))
    op.drop_column('deployment', 'download_token')
    op.add_column('deployment_target',
                  sa.Column('token_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
    op.create_index(op.f('ix_deployment_target_token_hash'), 'deployment_target', ['token_hash'], unique=False)
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
    op.drop_index(op.f('ix_deployment_target_token_hash'), table_name='deployment_target')
    op.drop_column('deployment_target', 'token_hash')
    # The old plain-text tokens are gone; downgraded deployments get an unusable placeholder.
    op.add_column('deployment', sa.Column('download_token', sqlmodel.sql.sqltypes.AutoString(length=64),
                                          nullable=False, server_default='revoked'))
    op.drop_column('deployment', 'rollback')
    op.drop_index(op.f('ix_model_version_release'), table_name='model_version')
    op.drop_column('model_version', 'release')
