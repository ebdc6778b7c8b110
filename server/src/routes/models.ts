import type { Routes } from '../http.js';

export const modelRoutes: Routes = {};
